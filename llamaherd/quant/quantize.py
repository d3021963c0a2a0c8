"""Float weights into GGUF blocks in memory (no file): Q8_0, the type a trained model's weights
take when handed to the packed kernels (e.g. a policy refreshed into the engine after each
update)."""

from __future__ import annotations

import torch

Q8_0_BLOCK = 32  # weights a block; each block stores a float16 scale then 32 int8 values


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 rows of a float matrix [N, K] (K a multiple of 32): uint8 [N, K / 32 * 34].
    Per block of 32: d = max|w| / 127, q = round(w / d) (halves away from zero, as llama.cpp)."""
    n, k = weight.shape
    if k % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows of a multiple of {Q8_0_BLOCK} values, got {k}")
    blocks = weight.detach().float().reshape(n, k // Q8_0_BLOCK, Q8_0_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    scaled = blocks * inv
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp_(-127, 127).to(torch.int8)
    out = torch.empty(n, k // Q8_0_BLOCK, 2 + Q8_0_BLOCK, dtype=torch.uint8)
    out[..., :2] = d.to(torch.float16).view(torch.uint8).reshape(n, k // Q8_0_BLOCK, 2)
    out[..., 2:] = q.view(torch.uint8)
    return out.reshape(n, -1)
