"""Pure-torch dequantization of GGUF rows: the fallback path when the C++ kernels are missing."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

FLOAT_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def row_bytes(qtype: int | GGMLQuantizationType, n: int) -> int:
    """Bytes that one row of n weights takes in GGUF."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if n % block:
        raise ValueError(f"{GGMLQuantizationType(qtype).name} rows need a multiple of {block} "
                         f"weights, got {n}")
    return n // block * size


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 stored at byte `start` of every block, as float32 [..., nb, 1]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes of nibbles -> 32 values: low nibbles are elements 0..15, high ones 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


def dequantize(data: torch.Tensor, qtype: int | GGMLQuantizationType) -> torch.Tensor:
    """GGUF rows (uint8 [rows, bytes_per_row]) -> float32 [rows, weights_per_row]."""
    qtype = GGMLQuantizationType(qtype)
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"expected uint8 [rows, bytes] GGUF data, got {data.dtype} {tuple(data.shape)}")
    rows = data.shape[0]
    if qtype in FLOAT_DTYPES:
        return data.contiguous().view(FLOAT_DTYPES[qtype]).float()
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(rows, -1, size)
    if qtype == GGMLQuantizationType.Q8_0:
        w = _halves(blocks, 0) * blocks[..., 2:].view(torch.int8).float()
    elif qtype == GGMLQuantizationType.Q4_0:
        w = _halves(blocks, 0) * (_nibbles(blocks[..., 2:]) - 8)
    elif qtype == GGMLQuantizationType.Q4_1:
        w = _halves(blocks, 0) * _nibbles(blocks[..., 4:]) + _halves(blocks, 2)
    else:  # k-quants and the rest: the gguf package's numpy reference, slower but exact
        from gguf.quants import dequantize as gguf_dequantize

        w = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(data.numpy(), qtype)))
    return w.reshape(rows, -1)
