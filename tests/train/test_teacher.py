"""The teacher's top-k cache: what it holds equals the teacher's own logits at each trained
position, it maps back onto examples in any packing, and it is reused only for the same teacher,
k and data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaherd.train.data import Example
from llamaherd.train.losses import cross_entropy
from llamaherd.train.packing import IGNORE, pack
from llamaherd.train.teacher import (
    CACHE,
    CACHE_INFO,
    TaughtExample,
    attach_top_k,
    cache_matches,
    fingerprint,
    teacher_top_k,
    top_k_of_batch,
    write_cache,
)
from tests.support.models import TINY, make_tiny_model


def examples(n: int = 6, seed: int = 0) -> list[TaughtExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i % 4 * 3
        tokens = torch.randint(0, TINY.vocab_size, (length,), generator=g).tolist()
        start = 1 + i % 3  # a prompt of 1 to 3 untrained tokens
        out.append(TaughtExample(tokens, [j >= start for j in range(length)], f"x:{i}"))
    return out


def expected_top_k(model, ex: Example, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of the full logits of the example run alone, at its trained positions."""
    with torch.no_grad():
        logits = model(torch.tensor([ex.tokens]))[0]
    at = [t for t in range(len(ex) - 1) if ex.labels[t + 1]]
    top = logits[at].topk(k, dim=-1)
    return top.indices, top.values


def test_the_top_k_are_the_teachers_own_at_every_trained_position(monkeypatch) -> None:
    monkeypatch.setattr(cross_entropy, "CHUNK_FLOATS", TINY.vocab_size * 3)  # 3 rows a chunk
    model = make_tiny_model()
    data = examples()
    tops = teacher_top_k(model, data, k=5, max_len=32, micro_tokens=24)  # several forwards
    assert len(tops) == len(data)
    for ex, (ids, logits) in zip(data, tops):
        want_ids, want_logits = expected_top_k(model, ex, 5)
        assert ids.dtype == torch.int32 and ids.shape == (ex.trained, 5)
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_the_cache_maps_back_onto_examples_in_any_packing(tmp_path: Path) -> None:
    model = make_tiny_model()
    data = examples()
    data.append(TaughtExample(list(data[0].tokens), list(data[0].labels), "x:dup"))
    write_cache(tmp_path, "tiny", 4, data, teacher_top_k(model, data, 4, max_len=32))
    info = json.loads((tmp_path / CACHE_INFO).read_text())
    assert info["k"] == 4 and info["teacher"] == "tiny" and info["examples"] == len(data) - 1
    assert info["positions"] == sum(e.trained for e in data[:-1])  # the duplicate stored once

    again = [TaughtExample(e.tokens, e.labels, e.where) for e in reversed(data)]
    attach_top_k(again, tmp_path)
    batch = pack(again, 24)  # several examples a row
    assert batch.tokens.shape[0] < len(again)
    ids, logits = top_k_of_batch(again, batch)
    with torch.no_grad():
        full = model(batch.tokens, batch.positions, documents=batch.documents)
    want = full[batch.targets != IGNORE].topk(4, dim=-1)
    assert torch.equal(ids.long(), want.indices)
    torch.testing.assert_close(logits, want.values, rtol=1e-5, atol=1e-5)


def test_the_cache_is_reused_only_for_the_same_teacher_k_and_data(tmp_path: Path) -> None:
    data = examples()
    assert not cache_matches(tmp_path, "tiny", 4, data)  # nothing there yet
    write_cache(tmp_path, "tiny", 4, data, teacher_top_k(make_tiny_model(), data, 4, 32))
    assert cache_matches(tmp_path, "tiny", 4, data)
    assert cache_matches(tmp_path, "tiny", 4, list(reversed(data)))  # another split or order
    assert fingerprint(data) == fingerprint(list(reversed(data)))
    assert not cache_matches(tmp_path, "tiny", 8, data)
    assert not cache_matches(tmp_path, "other", 4, data)
    assert not cache_matches(tmp_path, "tiny", 4, data[:-1])
    changed = [Example(data[0].tokens, [False, *data[0].labels[1:-1], False], "y"), *data[1:]]
    assert not cache_matches(tmp_path, "tiny", 4, changed)  # another loss mask
    (tmp_path / CACHE).unlink()
    assert not cache_matches(tmp_path, "tiny", 4, data)  # a description without its tensors
