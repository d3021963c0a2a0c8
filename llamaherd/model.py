"""The Llama transformer: one model for Llama 2, 3.1, 3.2 and SmolLM2, told apart only by ModelArgs.

Weights use Meta's names and layout (rotary on adjacent pairs of each head's dimensions, the form
Meta checkpoints and GGUF files store); the Hugging Face loader permutes wq/wk rows into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llamaherd.config import ModelArgs, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotation frequency of each dimension pair, with Llama 3.1 long-context scaling if given."""
    # float32 throughout, as Meta's and Hugging Face's code compute it, so logits agree bit-closely
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if scaling is None:
        return freqs
    low_wl = scaling.original_context / scaling.low_freq_factor
    high_wl = scaling.original_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_wl, freqs / scaling.factor, blended)
    return torch.where(wavelen < high_wl, freqs, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head.  x: (B, T, H, D); cos/sin: (B, T, 1, D/2)."""
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Pre-allocated keys and values for `batch` sequences (cache rows) of up to `max_len` tokens."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, rows: torch.Tensor | None, pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, D) at positions pos (B, T); return the first `length` slots."""
        B, T = pos.shape
        if rows is None and T == 1 and B == 1:
            p = int(pos[0, 0])
            self.k[:1, :, p] = k[:, :, 0]
            self.v[:1, :, p] = v[:, :, 0]
        else:
            r = (torch.arange(B, device=pos.device) if rows is None else rows)[:, None]
            self.k[r, :, pos] = k.transpose(1, 2)  # indexed view is (B, T, n_kv, D)
            self.v[r, :, pos] = v.transpose(1, 2)
        if rows is None:
            return self.k[:B, :, :length], self.v[:B, :, :length]
        return self.k[rows, :, :length], self.v[rows, :, :length]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                rows: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.cache is None:  # no cache: plain causal attention over the input
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            length = int(pos.max()) + 1
            k, v = self.cache.update(rows, pos, k, v, length)
            if B == 1 and T == 1:
                mask = None  # one query at the last position sees every cached key
            else:
                mask = (torch.arange(length, device=x.device) <= pos[:, :, None])[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                rows: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, pos, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_freqs",
                             rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling),
                             persistent=False)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        """Allocate a KV cache for `batch` rows of up to `max_len` positions (None to drop it)."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the context window "
                             f"{self.args.max_seq_len}")
        device = self.rope_freqs.device
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, self.args.n_kv_heads, max_len,
                                            self.args.head_dim, dtype).to(device)

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(rows, max_len) of the current cache, or None."""
        cache = self.layers[0].attention.cache
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None,
                output_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `tokens` (B, T).

        input_pos: (B, T) or (T,) position of each token (default 0..T-1); with a cache, keys and
        values are written there and each query sees cached positions <= its own.
        cache_rows: (B,) which cache row each batch row uses (default 0..B-1).
        output_index: (B,) if given, only the logits of token output_index[b] in each row are
        computed, shape (B, V); otherwise (B, T, V).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(B, T)
        angles = input_pos[..., None].float() * self.rope_freqs  # (B, T, D/2)
        cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, cache_rows)
        if output_index is not None:
            h = h[torch.arange(B, device=h.device), output_index]
        return self.output(self.norm(h)).float()
