"""Packing: examples share rows without seeing each other."""

from __future__ import annotations

import torch

from llamaherd.train.data import Example
from llamaherd.train.packing import IGNORE, pack, rows_of
from tests.support.models import TINY, make_tiny_model


def example(tokens: list[int], trained_from: int, where: str = "x") -> Example:
    return Example(tokens, [i >= trained_from for i in range(len(tokens))], where)


def test_rows_are_filled_first_fit_in_order() -> None:
    sizes = [5, 4, 3, 6, 2]
    rows = rows_of([example(list(range(n)), 0) for n in sizes], max_len=9)
    assert rows == [[0, 1], [2, 3], [4]]  # sizes 5+4, 3+6, 2


def test_packed_targets_positions_and_documents() -> None:
    a, b = example([10, 11, 12, 13], 2), example([20, 21, 22], 1)
    batch = pack([a, b], max_len=16)
    assert batch.tokens.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.documents.tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert batch.sequences.tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    # position t predicts token t + 1 of its own example where that token is trained
    assert batch.targets.tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]]
    assert batch.n_targets == 4 == a.trained + b.trained and batch.n_tokens == 7


def test_a_packed_row_computes_what_each_example_computes_alone() -> None:
    model = make_tiny_model(TINY)
    g = torch.Generator().manual_seed(0)
    examples = [example(torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist(), 1)
                for n in (7, 12, 5, 9)]
    batch = pack(examples, max_len=24)
    assert batch.tokens.shape[0] == 2  # two rows, each holding two examples
    with torch.no_grad():
        packed = model(batch.tokens, batch.positions, documents=batch.documents)
        for r in range(batch.tokens.shape[0]):
            for d in range(int(batch.documents[r].max()) + 1):
                cols = (batch.documents[r] == d).nonzero()[:, 0]
                alone = model(batch.tokens[r, cols][None])[0]
                torch.testing.assert_close(packed[r, cols], alone, atol=2e-5, rtol=1e-5)
