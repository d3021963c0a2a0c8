"""The model as the engine runs it, and `prepare`, the one call that readies a loaded model.

A Runner owns the model's KV cache and runs forward passes over it on the fastest path the
model's weights allow: for packed GGUF weights, the fused decode step (every layer in one C++
call) for decode steps and short prefills, and the layers (with the kernels' modules swapped in)
for the rest; for any other model, the model's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from llamaherd import kernels
from llamaherd.model import KVCache, Transformer
from llamaherd.quant.gguf_linear import GGUFLinear
from llamaherd.runtime.decoder import FusedDecoder
from llamaherd.runtime.kv_cache import copy_rows, zeros_on_demand
from llamaherd.runtime.modules import KernelFeedForward, fuse_projections, use_kernel_norms

# The fused step also takes short prefills, each prompt token one more row of the step: up to
# FUSED_PREFILL_LEN tokens of one sequence and FUSED_PREFILL_TOKENS in all. Longer prompts go
# through the layers, whose attention takes tiles of queries where the fused step converts each
# query's keys on its own (docs/performance.md has the measurements behind these bounds).
FUSED_PREFILL_LEN, FUSED_PREFILL_TOKENS = 256, 512


class Runner:
    """A model in eval mode with its KV cache and, for packed weights, the fused decode step.

    kv_dtype: the cache's dtype (default: the activations').
    """

    def __init__(self, model: Transformer, decoder: FusedDecoder | None = None,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.decoder = decoder
        self.kv_dtype = kv_dtype or model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.rope_freqs.device

    @property
    def attentions(self) -> list[nn.Module]:
        """Each layer's attention module (as the model holds them now)."""
        return [layer.attention for layer in self.model.layers]

    @property
    def cache(self) -> KVCache | None:
        """The first layer's cache: the model's current cache, whoever set it up."""
        return self.model.layers[0].attention.cache

    def setup_cache(self, rows: int, max_len: int) -> None:
        """A cache of `rows` rows of `max_len` positions whose memory is taken as it is written."""
        self.model.setup_cache(rows, max_len, self.kv_dtype, zeros_on_demand)

    def copy_rows(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Copy positions start..n-1 of cache row src into row dst, in every layer."""
        copy_rows(self.attentions, src, dst, n, start)

    def fits(self, tokens: int | None = None) -> bool:
        """Whether the fused step can take `tokens` tokens now (None: a decode step, one token a
        sequence, however many sequences)."""
        return (self.decoder is not None
                and (tokens is None or tokens <= FUSED_PREFILL_TOKENS)
                and self.decoder.usable() and not torch.is_grad_enabled())

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                output_index: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer.forward over the cache (tokens and pos (B, T), rows (B,) or None), through
        the fused step where it fits."""
        B, T = tokens.shape
        if (T == 1 and self.fits()) or (1 < T <= FUSED_PREFILL_LEN and self.fits(B * T)):
            h = self.decoder(self.model.tok_embeddings(tokens), pos, rows)
            if output_index is not None:
                h = h[torch.arange(B, device=h.device), output_index]
            return self.model.head(h)
        return self.model(tokens, pos, rows, output_index)

    def forward_tokens(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:
        """Logits (K, V) of the tokens `keep` (K indices) of one fused step over N tokens (N,):
        token i sits at position pos[i] of cache row rows[i]; every token's keys and values are
        written before any attends, each to its row's positions up to its own. So a decode step
        and new prompts (each prompt token one more row) go through the weights in one pass.
        Only where `fits`."""
        h = self.decoder(self.model.tok_embeddings(tokens[:, None]), pos[:, None], rows)
        return self.model.head(h[keep, 0])


def _packed(model: Transformer) -> bool:
    """Whether every projection of every block holds packed GGUF weights."""
    projections = [module for layer in model.layers
                   for part in (layer.attention, layer.feed_forward)
                   for name, module in part.named_children() if name != "cache"]
    return all(isinstance(p, GGUFLinear) and p.packed for p in projections)


def prepare(model: Transformer) -> Runner:
    """Ready a loaded model for inference: the one place that decides how it runs.

    A model whose block projections all hold packed GGUF weights gets q|k|v and gate|up fused
    (packed weights loaded side by side join without a copy), the kernels' RMSNorm, SwiGLU and
    prefill attention swapped in, the fused decode step, and a float16 KV cache (as llama.cpp
    keeps it: half the cache's memory traffic). Any other model (float, weight-only quantized, or
    packed without the kernels) runs its own modules with a cache of its own dtype.
    """
    model.eval()
    ops = kernels.load() if _packed(model) else None
    if ops is None:
        return Runner(model)
    fuse_projections(model, ops.attention, KernelFeedForward)
    use_kernel_norms(model)
    return Runner(model, FusedDecoder.build(model), kv_dtype=torch.float16)
