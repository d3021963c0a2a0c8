"""GGUF k-quant tensors rewritten once, at load, into the types the C++ kernels multiply.

Q4_K super-blocks of 256 weights are eight 32-weight sub-blocks w = d*sc*q - dmin*m with 4-bit q:
each is exactly a Q4_1 block (scale d*sc, min -dmin*m), up to rounding those two products to
float16, so Q4_K weights keep their size and their 4-bit values. Q5_K and Q6_K have no 5- or
6-bit kernel: they are requantized to Q8_0 (8-bit blocks of 32), whose rounding error (at most
1/254 of a block's largest weight) is a small fraction of their own 5- and 6-bit steps.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llamaherd import kernels

# the kernel type each k-quant becomes
KERNEL_TYPE = {T.Q4_K: T.Q4_1, T.Q5_K: T.Q8_0, T.Q6_K: T.Q8_0}


def convert(data: np.ndarray, qtype: T, target: T | None = None) -> tuple[np.ndarray, T]:
    """GGUF rows uint8 [rows, bytes] of type `qtype` as rows of `target` (default
    KERNEL_TYPE[qtype]); returns (rows, their type). Q8_0 is a valid target for any type."""
    target = target or KERNEL_TYPE[qtype]
    if target == qtype:
        return data, qtype
    ops = kernels.load()
    if ops is not None and target == KERNEL_TYPE.get(qtype):  # the same bytes, much faster
        with warnings.catch_warnings():  # a read-only memory map is fine: it is only read
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(np.ascontiguousarray(data))
        return ops.kquant_to_kernel(rows, int(qtype)).numpy(), target
    return convert_numpy(data, qtype, target), target


def convert_numpy(data: np.ndarray, qtype: T, target: T) -> np.ndarray:
    """convert's rows through the gguf package's numpy dequantization (any type to Q8_0)."""
    if (qtype, target) == (T.Q4_K, T.Q4_1):
        return _q4_k_as_q4_1(np.asarray(data))
    if target != T.Q8_0:
        raise ValueError(f"no conversion from {qtype.name} to {target.name}")
    rows = np.asarray(data).shape[0]
    weights = gguf_dequantize(np.asarray(data), qtype).reshape(rows, -1)
    return gguf_quantize(weights, T.Q8_0)


def _q4_k_as_q4_1(data: np.ndarray) -> np.ndarray:
    rows = data.shape[0]
    blocks = data.reshape(-1, 144)  # d f16 | dmin f16 | 12 bytes of 6-bit scales, mins | 128 qs
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    qs = blocks[:, 16:].reshape(n, 4, 32)  # byte e of chunk i: sub-block 2i low, 2i+1 high nibble
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    out = np.empty((n, 8, 20), dtype=np.uint8)  # Q4_1: d f16 | m f16 | byte i = q[i] | q[i+16]<<4
    out[..., 0:2] = (d * sc).astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = (-dmin * mins).astype(np.float16)[..., None].view(np.uint8)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return out.reshape(rows, -1)
