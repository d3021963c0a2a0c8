"""KV cache storage for inference: memory mapped as it is written, and rows copied between slots."""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn

from llamaherd import kernels


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros. From 4 MB on, its memory is mapped fresh from the OS, which provides
    it page by page as it is first written and takes it back whole when the tensor is freed: a
    large cache costs memory as it fills (a server's 8 x 2048-position cache would otherwise be
    hundreds of MB of zeros from the start). Smaller ones come from the allocator, which can reuse
    the memory that earlier work freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 4 << 20:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # reads see zeros
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def cache_buffers(attentions: list[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The keys and the values caches of each of `attentions` (each holding a KVCache), looked up
    now through the modules' own dicts rather than by attribute: nn.Module.__getattr__ is slow
    enough to matter when the fused step does this every step."""
    caches = [attention._modules["cache"] for attention in attentions]
    return [c._buffers["k"] for c in caches], [c._buffers["v"] for c in caches]


@torch.inference_mode()  # also called while sequences are added, in the caller's mode
def copy_rows(attentions: list[nn.Module], src: int, dst: int, n: int, start: int = 0) -> None:
    """Copy positions start..n-1 of cache row src into row dst in every layer's cache: one C++
    call for all of them when the kernels are loaded (a CPU cache), else torch slices."""
    keys, values = cache_buffers(attentions)
    caches = keys + values
    ext = kernels.loaded() if caches[0].device.type == "cpu" else None
    if ext is not None:
        ext.copy_rows(caches, src, dst, start, n)
        return
    for cache in caches:
        cache[dst, :, start:n] = cache[src, :, start:n]
