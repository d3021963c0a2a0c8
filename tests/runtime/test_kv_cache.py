"""The inference runtime's KV cache storage: memory taken as it is written."""

from __future__ import annotations

import torch

from llamaherd.runtime.kv_cache import zeros_on_demand


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
