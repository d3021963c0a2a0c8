"""Inputs and reference results shared by the kernel, runtime and checkpoint tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def draw_cases(vocab: int = 32003, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of a token draw (logits with forbidden -inf tokens, a vocabulary not a multiple of
    16, temperatures, uniform numbers u) and the tokens any correct inverse-CDF draw returns: each
    u lies in the middle of its token's interval of the float64 CDF (tokens of probability above
    1e-5, so float32 sums cannot cross a boundary), or is 0 or just below 1 (the first and last
    allowed tokens, on a row whose weights all stay within float32's range)."""
    g = torch.Generator().manual_seed(seed)
    temperatures = [0.3, 0.8, 1.0, 1.7, 0.05, 3.0]
    logits = torch.randn(len(temperatures), vocab, generator=g) * 2
    logits[torch.rand(logits.shape, generator=g) < 0.3] = -torch.inf
    logits[:, -5:] = -torch.inf  # the last tokens are forbidden: u near 1 must not reach them
    rows, ts, us, tokens = [], [], [], []
    for r, t in enumerate(temperatures):
        probs = (logits[r].double() / t).softmax(-1)
        cdf = probs.cumsum(-1)
        likely = (probs > 1e-5).nonzero()[:, 0]
        for i in likely[torch.randperm(len(likely), generator=g)[:5]].tolist():
            rows.append(r), ts.append(t), tokens.append(i)
            us.append(float(cdf[i] - probs[i] / 2) / float(cdf[-1]))
        if t == 1.0:
            allowed = (logits[r] > -torch.inf).nonzero()[:, 0]
            for u, i in ((0.0, allowed[0]), (1 - 2**-53, allowed[-1])):
                rows.append(r), ts.append(t), us.append(u), tokens.append(int(i))
    return {"logits": logits[rows].contiguous(), "temperatures": torch.tensor(ts),
            "u": torch.tensor(us, dtype=torch.float64), "tokens": torch.tensor(tokens)}


def rewrite_gguf(src: Path, dst: Path,
                 tensor: Callable[[str, object], tuple[np.ndarray, int] | None] = lambda n, t: None,
                 extra: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of the GGUF file `src` at `dst`: the same metadata, each tensor as
    `tensor(name, GGUFTensor)` gives it as (data, GGML type), or unchanged where that is None,
    then the float32 tensors `extra`. (gguf cannot quantize to k-quants: tests write raw blocks.)"""
    from gguf import GGUFWriter

    from llamaherd.checkpoint.gguf import read_gguf

    f = read_gguf(src)
    w = GGUFWriter(dst, "llama")
    for key, value in f.metadata.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            vtype, etype = f.value_types[key]
            w.add_key_value(key, value, vtype, sub_type=etype)
    for name, t in f.tensors.items():
        data, qtype = tensor(name, t) or (np.asarray(t.data), t.qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def attention_case(head_dim: int, cache_dtype: torch.dtype, T: int = 37) -> tuple[torch.Tensor, ...]:
    """(q, k, v, rows, pos) for the kernels' attention over a cache: 2 sequences of T queries, 9
    query heads on 3 kv heads, rows out of order, the second after a 21-token cached prefix."""
    g = torch.Generator().manual_seed(head_dim)
    k = torch.randn(4, 3, T + 43, head_dim, generator=g).to(cache_dtype)
    v = torch.randn(4, 3, T + 43, head_dim, generator=g).to(cache_dtype)
    q = torch.randn(2, T, 9, head_dim, generator=g)
    pos = torch.tensor([0, 21])[:, None] + torch.arange(T)
    return q, k, v, torch.tensor([3, 1]), pos


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                        pos: torch.Tensor) -> torch.Tensor:
    """SDPA over each query's cache row, masked to positions <= its own: (B, T, H, D)."""
    keys, values = k[rows].float(), v[rows].float()  # (B, Hkv, L, D)
    mask = (torch.arange(k.shape[2]) <= pos[:, :, None])[:, None]  # (B, 1, T, L)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)
