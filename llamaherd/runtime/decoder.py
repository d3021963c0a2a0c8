"""The fused decode step: every layer of a step over packed weights in one C++ call."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from llamaherd import kernels
from llamaherd.model import KVCache
from llamaherd.quant.gguf_linear import GGUFLinear
from llamaherd.runtime.kv_cache import cache_buffers
from llamaherd.runtime.modules import FusedAttention, FusedFeedForward, KernelRMSNorm


class FusedDecoder:
    """Every layer of a decode step (one new token per sequence) in one C++ call.

    For a model whose projections are fused, packed GGUF layers and whose norms are KernelRMSNorm
    (what runtime.prepare makes of a packed GGUF model); `build` returns None for any other
    model. Computes what the layers' forward computes for T = 1, with the same kernels for the
    projections. It holds the weights and rotary frequencies the model had when built: build it
    again after changing them.
    """

    def __init__(self, model: nn.Module, ops: ModuleType) -> None:
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
        ops = kernels.load()
        if ops is None:
            return None
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            if not isinstance(att, FusedAttention) or not isinstance(ffn, FusedFeedForward):
                return None
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
