"""The Transformer's cache paths: consecutive cache rows (views) and arbitrary rows (gathers)."""

from __future__ import annotations

import torch
from conftest import TINY, make_tiny_model

from llamaherd.model import zeros_on_demand


@torch.inference_mode()
def test_cache_rows_consecutive_or_not_give_the_same_logits() -> None:
    model = make_tiny_model(TINY)
    a, b = torch.tensor([[5, 9, 11, 3]]), torch.tensor([[7, 2, 8, 30]])
    ref = [model(x)[0, -1] for x in (a, b)]  # no cache

    def run(rows: list[int]) -> list[torch.Tensor]:
        model.setup_cache(4, 16)
        both = torch.cat([a, b])
        pos = torch.arange(3).expand(2, 3)
        model(both[:, :3], pos, cache_rows=torch.tensor(rows))
        out = model(both[:, 3:], torch.full((2, 1), 3), cache_rows=torch.tensor(rows))
        return [out[0, -1], out[1, -1]]

    for rows in ([2, 3], [3, 1], [0, 1]):  # consecutive (a slice), reversed gap, the first rows
        got = run(rows)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    model.drop_cache()


@torch.inference_mode()
def test_batched_decode_at_different_positions_matches_single_runs() -> None:
    model = make_tiny_model(TINY)
    prompts = [torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[9, 8]])]
    ref = [model(p)[0, -1] for p in prompts]
    model.setup_cache(2, 16)
    # right-padded prefill: row 1's padding lands at positions its later tokens overwrite
    padded = torch.tensor([[1, 2, 3, 4], [9, 0, 0, 0]])
    model(padded, torch.arange(4).expand(2, 4))
    out = model(torch.tensor([[5], [8]]), torch.tensor([[4], [1]]))
    for i in range(2):
        torch.testing.assert_close(out[i, -1], ref[i], atol=1e-5, rtol=1e-5)
    model.drop_cache()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_a_large_cache_takes_memory_as_it_is_written() -> None:
    big = zeros_on_demand((4, 1024, 4096), torch.float32)  # 64 MB
    small = zeros_on_demand((16, 64), torch.float16)
    assert not big.any() and not small.any() and small.dtype == torch.float16
    before = _rss_mb()
    big[0] = 1.0  # a quarter of it
    grown = _rss_mb() - before
    assert 14 < grown < 20, f"writing 16 MB of a 64 MB cache grew RSS by {grown:.1f} MB"
    assert int(big.sum()) == 1024 * 4096
