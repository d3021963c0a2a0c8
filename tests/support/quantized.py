"""Quantized weights for tests, and what the kernels compute from them, written out in torch."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llamaherd import kernels

KERNEL_TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
SHAPES = [(576, 577), (1536, 193), (64, 5)]  # (in_features, out_features): odd and tail-group rows
ROWS = [1, 3, 8, 64, 512]


def random_weights(qtype: T, out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Packed GGUF rows: quantized Gaussians, or (k-quants, which gguf cannot quantize) random
    bytes whose f16 super-block scales are set to sane values."""
    rng = np.random.default_rng(seed)
    if qtype not in K_QUANTS:
        return gguf_quantize(rng.standard_normal((out_features, in_features), np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (out_features, in_features // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, data.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:  # d is the last field
        data[..., -2:] = scales[..., :2]
    else:  # d and dmin lead the block
        data[..., :4] = scales
    return data.reshape(out_features, -1)


def reference(data: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(data, qtype).astype(np.float32))


def activations_as_kernels_see_them(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 8-bit blocks of 32 exactly as the kernels quantize it (same float ops)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a tensor numerator: `127 / amax` would compute 127 * (1 / amax), rounded differently
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)


def bf16_path(rows: int, bf16_min_rows: int | None = None) -> bool:
    """Whether a build whose bf16_min_rows() is this (default: the native build's) multiplies
    `rows` activation rows with AMX-BF16 (bfloat16 products) rather than 8-bit integer dots."""
    if bf16_min_rows is None:
        bf16_min_rows = kernels.load().bf16_min_rows()
    return 0 < bf16_min_rows <= rows


def as_kernels_compute(x: torch.Tensor, w: torch.Tensor,
                       bf16_min_rows: int | None = None) -> torch.Tensor:
    """x @ w.T with the rounding of the kernels' path for x's row count (see bf16_path): the
    activations in 8-bit blocks, or activations and weights in bfloat16; summed in float64."""
    if bf16_path(x.shape[0], bf16_min_rows):
        return (x.bfloat16().double() @ w.bfloat16().double().T).float()
    return (activations_as_kernels_see_them(x).double() @ w.double().T).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                 dim=0).item()
