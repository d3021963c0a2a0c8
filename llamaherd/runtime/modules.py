"""Inference forms of the model's modules, swapped in by function: fused projections (q|k|v and
gate|up as one matrix each) and the C++ kernels' RMSNorm, SwiGLU and attention over the cache.

Each computes what the module it replaces computes; the swaps change speed, not results (up to
the order of sums). Training uses the pure model: every swap here is for a model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd import kernels
from llamaherd.model import Attention, FeedForward, RMSNorm, StepContext, apply_rope, attend

# (q (B, T, H, D), cache k, cache v, rows (B,), pos (B, T)) -> (B, T, H, D): causal attention of
# T > 1 queries over their cache rows (the kernels' `attention`)
CachedAttention = Callable[..., torch.Tensor]


def join_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of several projections of the same input,
    or None when they cannot be joined (e.g. quantized weights of different types)."""
    kinds = {type(lin) for lin in linears}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if hasattr(kind, "concat"):  # quantized layers know how to join themselves
        try:
            return kind.concat(linears)
        except ValueError:
            return None
    if kind is not nn.Linear:
        return None
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class FusedAttention(nn.Module):
    """model.Attention with wq, wk and wv as one projection wqkv (one matrix call instead of
    three), the q and k heads rotated in one call. With `cached_attention`, T > 1 queries attend
    over the KV cache through it (the kernels' prefill attention) instead of SDPA."""

    def __init__(self, attention: Attention, wqkv: nn.Module,
                 cached_attention: CachedAttention | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = attention.n_heads, attention.n_kv_heads
        self.head_dim = attention.head_dim
        self.wqkv, self.wo = wqkv, attention.wo
        self.cache = attention.cache
        self.cached_attention = cached_attention

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x)  # (B, T, (H + 2 Hkv) D)
        qk = qkv[..., :(H + Hkv) * self.head_dim].view(B, T, H + Hkv, -1)
        q, k = apply_rope(qk, ctx.rot).split((H, Hkv), dim=2)
        v = qkv[..., (H + Hkv) * self.head_dim:].view(B, T, Hkv, -1)
        if self.cache is not None and self.cached_attention is not None and T > 1:
            self.cache.update(ctx.rows, ctx.pos, k.transpose(1, 2), v.transpose(1, 2),
                              ctx.length)
            rows = ctx.rows if isinstance(ctx.rows, torch.Tensor) else torch.arange(
                ctx.rows.start, ctx.rows.stop)
            out = self.cached_attention(q, self.cache.k, self.cache.v, rows, ctx.pos)
        else:
            out = attend(q, k, v, self.cache, ctx)
        return self.wo(out.reshape(B, T, -1))


class FusedFeedForward(nn.Module):
    """model.FeedForward with w1 (gate) and w3 (up) as one projection w13."""

    def __init__(self, w13: nn.Module, w2: nn.Module) -> None:
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class KernelFeedForward(FusedFeedForward):
    """The SwiGLU feed-forward of a layer with fused, packed gate/up weights: w13, then SwiGLU in
    one C++ pass, then w2, over blocks of ROWS tokens, so that a long prompt's (T, 2 x hidden)
    intermediate never exists whole. Rows are independent, so the blocks give the same results
    as one pass."""

    ROWS = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        ops = kernels.load()
        flat = x.reshape(-1, x.shape[-1])  # (T, dim)
        if flat.shape[0] <= self.ROWS:
            return self.w2(ops.swiglu(self.w13(flat))).view(*x.shape[:-1], -1)
        out = torch.empty(flat.shape[0], self.w2.out_features)
        for i in range(0, flat.shape[0], self.ROWS):
            out[i:i + self.ROWS] = self.w2(ops.swiglu(self.w13(flat[i:i + self.ROWS])))
        return out.view(*x.shape[:-1], -1)


class KernelRMSNorm(nn.Module):
    """RMSNorm computed by one C++ call (the composed torch version is a dozen small ops)."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return kernels.load().rms_norm(x, self.weight, self.eps)


def fuse_projections(model: nn.Module, cached_attention: CachedAttention | None = None,
                     feed_forward: type[FusedFeedForward] = FusedFeedForward) -> bool:
    """Swap each layer's Attention for a FusedAttention and its FeedForward for `feed_forward`
    (FusedFeedForward or KernelFeedForward) where their projections can be joined; True if every
    layer was fused."""
    fused_all = True
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        if isinstance(att, Attention):
            wqkv = join_linears([att.wq, att.wk, att.wv])
            if wqkv is not None:
                layer.attention = FusedAttention(att, wqkv, cached_attention)
        if isinstance(ffn, FeedForward):
            w13 = join_linears([ffn.w1, ffn.w3])
            if w13 is not None:
                layer.feed_forward = feed_forward(w13, ffn.w2)
        fused_all &= not isinstance(layer.attention, Attention) and not isinstance(
            layer.feed_forward, FeedForward)
    return fused_all


def use_kernel_norms(model: nn.Module) -> None:
    """Swap every RMSNorm in `model` for a KernelRMSNorm."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RMSNorm):
            model.set_submodule(name, KernelRMSNorm(module))
