"""The Llama transformer: one model for Llama 2, 3.1, 3.2 and SmolLM2, told apart only by ModelArgs.

A plain, trainable torch module: `forward(tokens, input_pos)` gives logits, `hidden_states` the
final norm's output (for reward and value heads), and a KV cache can be set up for generation.
What makes inference fast (fused projections, C++ kernels, the fused decode step) is swapped in
from outside by llamaherd.runtime; this file imports none of it.

Weights use Meta's names and layout (rotary on adjacent pairs of each head's dimensions, the form
Meta checkpoints and GGUF files store); the Hugging Face loader permutes wq/wk rows into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.config import ModelArgs, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()  # half precision: normalize in float32
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotation frequency of each dimension pair, with Llama 3.1 long-context scaling if given."""
    # float32 throughout, as Meta's and Hugging Face's code compute it, so logits agree bit-closely
    # computed on the CPU even while a model is built on the meta device (values are needed)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim))
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


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head as complex numbers x[2i] + i x[2i+1].

    x: (B, T, H, D); rot: (B, T, 1, D/2) complex, e^(i * position * frequency).
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision rotates in float32
    xc = torch.view_as_complex(wide.unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


Zeros = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # (shape, dtype) -> zeros


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


class KVCache(nn.Module):
    """Pre-allocated keys and values for `batch` sequences (cache rows) of up to `max_len` tokens.

    `allocate` makes the two zero-filled tensors (an inference runtime may pass one that maps
    memory lazily)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, allocate: Zeros = zeros) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", allocate(shape, dtype), persistent=False)
        self.register_buffer("v", allocate(shape, dtype), persistent=False)

    def update(self, rows: torch.Tensor | slice, pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, D) at positions pos (B, T) of cache rows `rows`; return those
        rows' first `length` positions (a view when rows is a slice)."""
        B, T = pos.shape
        if isinstance(rows, slice) and T == 1 and B == 1:
            p = length - 1  # the one query is at the newest position (no tensor read needed)
            self.k[rows, :, p] = k[:, :, 0]
            self.v[rows, :, p] = v[:, :, 0]
        else:
            r = rows if isinstance(rows, torch.Tensor) else torch.arange(rows.start, rows.stop)
            r = r.to(pos.device)
            # indexed view is (B, T, n_kv, D); the cache may store a narrower dtype
            self.k[r[:, None], :, pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[r[:, None], :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :length], self.v[rows, :, :length]


SHARED = -2  # the document id of a packed row's shared prefix (see StepContext.make)


@dataclass
class StepContext:
    """What every layer of one forward pass shares: positions, rotations, cache rows, the mask."""

    pos: torch.Tensor  # (B, T) position of each token
    rot: torch.Tensor  # (B, T, 1, D/2) complex rotations for those positions
    rows: torch.Tensor | slice  # cache row of each batch row: (B,) ids, or a slice if consecutive
    length: int  # cached positions any query can see: max(pos) + 1
    mask: torch.Tensor | None  # True where a query may attend: (B, 1, T, length) over the
    # cache, or (B, 1, T, T) over packed rows' own documents; None = all
    packed: bool = False  # the mask keeps each token to its own document (no cache)

    @staticmethod
    def make(pos: torch.Tensor, rows: torch.Tensor | None, freqs: torch.Tensor,
             documents: torch.Tensor | None = None) -> StepContext:
        B, T = pos.shape
        if rows is None:
            rows = slice(0, B)
        elif bool((rows == rows[0] + torch.arange(B, device=rows.device)).all()):
            rows = slice(int(rows[0]), int(rows[0]) + B)  # a view of the cache, not a gather
        angles = pos[..., None].float() * freqs  # (B, T, D/2)
        rot = torch.polar(torch.ones_like(angles), angles)[:, :, None]
        length = int(pos.max()) + 1
        mask = None
        if documents is not None:  # packed rows: earlier tokens of the same document only,
            # and of a row's shared prefix (SHARED), which every document continues
            same = (documents[:, :, None] == documents[:, None, :]) | \
                (documents[:, None, :] == SHARED)
            return StepContext(pos, rot, rows, length,
                               (same & (pos[:, :, None] >= pos[:, None, :]))[:, None], True)
        if not (B == 1 and T == 1):  # one query at the newest position sees every cached key
            mask = (torch.arange(length, device=pos.device) <= pos[:, :, None])[:, None]
        return StepContext(pos, rot, rows, length, mask)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One query per row. q: (B, H, 1, D); k, v: (B, Hkv, L, D); mask: (B, 1, 1, L)."""
    B, H, _, D = q.shape
    groups = q.view(B, k.shape[1], H // k.shape[1], D)  # query heads sharing each kv head
    scores = torch.matmul(groups, k.transpose(-1, -2)) * D ** -0.5  # (B, Hkv, G, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).view(B, H, 1, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
           ctx: StepContext) -> torch.Tensor:
    """Causal attention of the queries q (B, T, H, D) over the keys and values k, v (B, T, Hkv, D)
    of the same tokens and, with a cache, over every cached position up to each query's own (k
    and v are written into the cache first). Returns (B, T, H, D)."""
    T = q.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    if cache is None and ctx.packed:  # packed rows: each document attends to itself
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
    elif cache is None:  # plain causal attention over the input
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
    else:
        k, v = cache.update(ctx.rows, ctx.pos, k, v, ctx.length)
        k, v = k.to(q.dtype), v.to(q.dtype)  # no copy unless the cache is narrower
        if T == 1 and ctx.mask is not None:  # batched decode: plain matmuls beat SDPA's
            out = decode_attention(q, k, v, ctx.mask)  # masked CPU kernel
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, -1), ctx.rot)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, -1), ctx.rot)
        v = self.wv(x).view(B, T, self.n_kv_heads, -1)
        return self.wo(attend(q, k, v, self.cache, ctx).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

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

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids -> logits. Without a cache, plain causal attention over the input (training,
    scoring); with one (setup_cache), each call writes its tokens' keys and values at their
    positions and attends to everything cached up to each token's own position (generation)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        weight = torch.empty(args.vocab_size, args.dim)
        if weight.device.type != "meta":  # on the meta device (loaders) there is nothing to fill,
            nn.init.normal_(weight)        # and its normal_ costs a second of imports
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=weight)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_freqs",
                             rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling),
                             persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (read off the final norm: the projections' weights may be
        quantized blocks)."""
        return self.norm.weight.dtype

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                    allocate: Zeros = zeros) -> None:
        """Give every layer a KV cache of `batch` rows of up to `max_len` positions, of `dtype`
        (default: the activations' dtype), its tensors made by `allocate`."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the context window "
                             f"{self.args.max_seq_len}")
        device = self.rope_freqs.device
        self.drop_cache()  # first: never two caches at once
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, self.args.n_kv_heads, max_len,
                                            self.args.head_dim, dtype or self.dtype,
                                            allocate).to(device)

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None,
                output_index: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `tokens` (B, T), in float32 (float64 for a float64 model).

        input_pos: (B, T) or (T,) position of each token (default 0..T-1); with a cache, keys and
        values are written there and each query sees cached positions <= its own.
        cache_rows: (B,) which cache row each batch row uses (default 0..B-1).
        output_index: (B,) if given, only the logits of token output_index[b] in each row are
        computed, shape (B, V); otherwise (B, T, V).
        documents: (B, T) without a cache, for rows that pack several examples: the example each
        token belongs to; attention never crosses examples (input_pos restarts with each), except
        into a row's shared prefix (document SHARED), which every example continues.
        """
        h = self.blocks(tokens, input_pos, cache_rows, documents)
        if output_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), output_index]
        return self.head(h)

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                      cache_rows: torch.Tensor | None = None,
                      documents: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output (B, T, dim): what the output projection reads, and what a
        reward or value head reads instead (arguments as for forward)."""
        return self.norm(self.blocks(tokens, input_pos, cache_rows, documents))

    def blocks(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
               cache_rows: torch.Tensor | None = None,
               documents: torch.Tensor | None = None) -> torch.Tensor:
        """The embeddings of `tokens` (B, T) through every block: (B, T, dim), before the final
        norm (arguments as for forward)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(B, T)
        if documents is not None and self.layers[0].attention.cache is not None:
            raise ValueError("documents (packed rows) are for forward passes without a cache")
        ctx = StepContext.make(input_pos, cache_rows, self.rope_freqs, documents)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, ctx)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states h (..., dim) taken from the last block, in float32 (float64
        for a float64 model)."""
        logits = self.output(self.norm(h))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))
