"""Single-kernel replacements for the model's small ops on the fast inference path."""

from __future__ import annotations

import torch
from torch import nn

from llamaherd.model import Attention, FeedForward, KVCache, RMSNorm, cache_buffers
from llamaherd.quant import kernels


class KernelRMSNorm(nn.Module):
    """RMSNorm computed by one C++ call (the composed torch version is a dozen small ops)."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return kernels.load().rms_norm(x, self.weight, self.eps)


class KernelFeedForward(nn.Module):
    """The SwiGLU feed-forward of a layer with fused, packed gate/up weights: w13, then SwiGLU in
    one C++ pass, then w2, over blocks of ROWS tokens, so that a long prompt's (T, 2 x hidden)
    intermediate never exists whole (at T = 512 on the default model the prefill's peak memory
    is ~9 MB lower). Rows are independent, so the blocks give the same results as one pass."""

    ROWS = 128

    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        self.w13, self.w2 = ffn.w13, ffn.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(torch.nn.functional.silu(gate) * up)
        ops = kernels.load()
        flat = x.reshape(-1, x.shape[-1])  # (T, dim)
        if flat.shape[0] <= self.ROWS:
            return self.w2(ops.swiglu(self.w13(flat))).view(*x.shape[:-1], -1)
        out = torch.empty(flat.shape[0], self.w2.out_features)
        for i in range(0, flat.shape[0], self.ROWS):
            out[i:i + self.ROWS] = self.w2(ops.swiglu(self.w13(flat[i:i + self.ROWS])))
        return out.view(*x.shape[:-1], -1)


def use_kernel_modules(model: nn.Module) -> int:
    """Swap every RMSNorm for KernelRMSNorm, and every feed-forward with packed fused gate/up
    weights for KernelFeedForward, when the C++ kernels are available; attention over the KV
    cache (prefill) then runs on the kernels too. Returns how many modules were swapped."""
    from llamaherd.quant.gguf_linear import GGUFLinear

    if not kernels.available():
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention):
            module.cached_attention = kernels.load().attention
            continue
        if isinstance(module, RMSNorm):
            swap = KernelRMSNorm(module)
        elif (isinstance(module, FeedForward)
              and all(isinstance(w, GGUFLinear) and w.packed for w in (module.w13, module.w2))):
            swap = KernelFeedForward(module)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, swap)
        swapped += 1
    return swapped


class FusedDecoder:
    """Every layer of a decode step (one new token per sequence) in one C++ call.

    For a model whose projections are fused, packed GGUF layers and whose norms are KernelRMSNorm
    (what the GGUF loader builds); `build` returns None for any other model. Computes what the
    layers' forward computes for T = 1, with the same kernels for the projections. It holds the
    weights and rotary frequencies the model had when built: build it again after changing them.
    """

    def __init__(self, model: nn.Module, ops) -> None:
        args = model.args
        self._impl = ops.Decoder(args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                                 args.hidden_dim, args.norm_eps, model.rope_freqs.float())
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            self._impl.add_layer(layer.attention_norm.weight.detach(), att.wqkv.data,
                                 att.wqkv.qtype_id, att.wo.data, att.wo.qtype_id,
                                 layer.ffn_norm.weight.detach(), ffn.w13.data, ffn.w13.qtype_id,
                                 ffn.w2.data, ffn.w2.qtype_id)
        self._attentions = [layer.attention for layer in model.layers]

    @staticmethod
    def build(model: nn.Module) -> FusedDecoder | None:
        from llamaherd.quant.gguf_linear import GGUFLinear

        ops = kernels.load()
        if ops is None:
            return None
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            projections = (att.wqkv, att.wo, ffn.w13, ffn.w2)
            if not all(isinstance(p, GGUFLinear) and p.packed for p in projections):
                return None
            if not all(isinstance(n, KernelRMSNorm) and n.weight.dtype == torch.float32
                       for n in (layer.attention_norm, layer.ffn_norm)):
                return None
        return FusedDecoder(model, ops)

    def usable(self) -> bool:
        """Whether the current KV cache is one this decoder can write (float32 or float16)."""
        cache = self._attentions[0].cache
        return isinstance(cache, KVCache) and cache.k.dtype in (torch.float32, torch.float16)

    def __call__(self, h: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """h: (B, T, dim) embeddings; pos: (B, T) positions; rows: (B,) cache rows (None: 0..B-1).

        T > 1 (a short prefill): every token is one more row of the step, in its sequence's cache
        row at its own position; all keys and values of a layer are written before any token
        attends, each to its row's positions up to its own."""
        B, T = pos.shape
        # the model's current caches, looked up each step: holding on to them here would keep a
        # dropped cache's memory alive until the next step
        keys, values = cache_buffers(self._attentions)
        if rows is None:
            rows = torch.arange(B)
        if T > 1:
            rows = rows.repeat_interleave(T)
        return self._impl.forward(h.reshape(B * T, -1), rows, pos.reshape(B * T), keys,
                                  values).view(B, T, -1)
