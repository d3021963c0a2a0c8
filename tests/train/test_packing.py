"""Packing: examples share rows without seeing each other."""

from __future__ import annotations

import torch

from llamaherd.model import SHARED
from llamaherd.train.data import Example
from llamaherd.train.losses import sft_loss
from llamaherd.train.packing import IGNORE, pack, rows_of, shared_prefix
from tests.support.models import TINY, make_tiny_model


def example(tokens: list[int], trained_from: int, where: str = "x") -> Example:
    return Example(tokens, [i >= trained_from for i in range(len(tokens))], where)


def test_rows_are_filled_first_fit_in_order() -> None:
    sizes = [5, 4, 3, 6, 2]
    rows = rows_of(sizes, max_len=9, where=['x'] * len(sizes))
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


def test_a_shared_prefix_is_the_untrained_start_every_example_has() -> None:
    a = example([1, 2, 3, 4, 5, 6], 5)
    b = example([1, 2, 3, 9, 9, 9, 7], 6)
    assert shared_prefix([a, b]) == 3  # the tokens differ from the 4th on
    assert shared_prefix([a, example([1, 2, 3, 4, 5, 8], 3)]) == 2  # its 3rd token's next trains
    assert shared_prefix([a, example([1, 2], 1)]) == 0  # position 0 already predicts a target
    assert shared_prefix([example([1, 2, 3], 3), example([1, 2, 3, 4], 4)]) == 2  # one kept


def test_a_shared_prefix_packs_once_a_row_and_every_example_continues_it() -> None:
    head = list(range(1, 17))  # 16 tokens: enough to be worth sharing
    a, b = example(head + [30, 31], 17), example(head + [40, 41, 42], 18)
    batch = pack([a, b], max_len=32, share_prefix=True)
    assert batch.tokens.tolist() == [head + [30, 31, 40, 41, 42]]
    assert batch.positions.tolist() == [list(range(16)) + [16, 17, 16, 17, 18]]
    assert batch.documents.tolist() == [[SHARED] * 16 + [0, 0, 1, 1, 1]]
    assert batch.sequences.tolist() == [[-1] * 16 + [0, 0, 1, 1, 1]]
    assert batch.targets.tolist() == [[IGNORE] * 16 + [31, IGNORE, IGNORE, 42, IGNORE]]


def test_sharing_a_prefix_leaves_logits_and_the_loss_as_packing_whole_examples() -> None:
    model = make_tiny_model(TINY)
    g = torch.Generator().manual_seed(1)
    head = torch.randint(0, TINY.vocab_size, (20,), generator=g).tolist()
    examples = [example(head + torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist(),
                        20 + n - 2) for n in (4, 7, 3, 6, 5)]
    shared = pack(examples, max_len=40, share_prefix=True)
    whole = pack(examples, max_len=40)
    assert shared.tokens.shape[0] < whole.tokens.shape[0] and shared.n_targets == whole.n_targets
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(model, shared), sft_loss(model, whole),
                                   atol=1e-5, rtol=1e-5)
        logits = model(shared.tokens, shared.positions, documents=shared.documents)
        for r in range(shared.tokens.shape[0]):
            for i in shared.sequences[r].unique().tolist():
                if i < 0:
                    continue
                cols = (shared.sequences[r] == i).nonzero()[:, 0]
                alone = model(torch.tensor([examples[i].tokens]))[0, 20:]
                torch.testing.assert_close(logits[r, cols], alone, atol=2e-5, rtol=1e-5)


def test_examples_that_start_alike_share_a_prefix_of_their_own() -> None:
    user = [5] * 20 + [1, 1, 1]
    agent = [5] * 3 + [6] * 17 + [2, 2, 2]
    examples = [example(user + [10, 11], 23), example(agent + [20, 21], 23),
                example(user + [12, 13], 23), example(agent + [22, 23], 23)]
    batch = pack(examples, max_len=64, share_prefix=True)
    assert batch.tokens.shape[0] == 2  # one row a group
    for r in range(2):
        p = int((batch.documents[r] == SHARED).sum())
        assert p == 22  # its group's 23 shared tokens but the last (which predicts a target),
        # not the 3 all four share
        assert sorted(set(batch.sequences[r].tolist()) - {-1}) in ([0, 2], [1, 3])
