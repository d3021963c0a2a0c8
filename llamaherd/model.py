"""The Llama transformer: one model for Llama 2, 3.1, 3.2 and SmolLM2, told apart only by ModelArgs.

Weights use Meta's names and layout (rotary on adjacent pairs of each head's dimensions, the form
Meta checkpoints and GGUF files store); the Hugging Face loader permutes wq/wk rows into it.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.config import ModelArgs, RopeScaling

if TYPE_CHECKING:
    from llamaherd.quant.fused import FusedDecoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
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
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


# A prefill of up to FUSED_PREFILL_LEN tokens a sequence, FUSED_PREFILL_TOKENS in all, runs
# through the fused decode step too (one C++ call for every layer, each token a row of the step):
# 40% faster for 16 tokens, 20% for 46, 5-30% from 129 to 256 (its feed-forward takes up to 256
# rows a pass); from ~320 tokens on the layers are as fast or faster, their attention taking
# tiles of queries where the fused step's converts each query's keys on its own.
FUSED_PREFILL_LEN, FUSED_PREFILL_TOKENS = 256, 512


def row_ids(rows: torch.Tensor | slice) -> torch.Tensor:
    """Cache row ids (B,) of a step's rows, given as ids or as a slice of consecutive rows."""
    return rows if isinstance(rows, torch.Tensor) else torch.arange(rows.start, rows.stop)


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros. From 4 MB on, its memory is mapped fresh from the OS, which provides
    it page by page as it is first written and takes it back whole when the tensor is freed: a
    large cache costs memory as it fills (a server's 8 x 2048-position cache would otherwise be
    ~380 MB of zeros from the start). Smaller ones come from the allocator, which can reuse the
    memory that earlier work freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 4 << 20:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # reads see zeros
    return torch.frombuffer(memory, dtype=dtype).view(shape)


class KVCache(nn.Module):
    """Pre-allocated keys and values for `batch` sequences (cache rows) of up to `max_len` tokens."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", zeros_on_demand(shape, dtype), persistent=False)
        self.register_buffer("v", zeros_on_demand(shape, dtype), persistent=False)

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
            r = row_ids(rows).to(pos.device)
            # indexed view is (B, T, n_kv, D); the cache may store a narrower dtype
            self.k[r[:, None], :, pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[r[:, None], :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :length], self.v[rows, :, :length]


def cache_buffers(attentions: list[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The keys and the values caches of each of `attentions` (each holding a KVCache), looked up
    now through the modules' own dicts: by attribute, nn.Module.__getattr__ made the default
    model's 90 lookups ~40 us (the fused step does this every step)."""
    caches = [attention._modules["cache"] for attention in attentions]
    return [c._buffers["k"] for c in caches], [c._buffers["v"] for c in caches]


@dataclass
class StepContext:
    """What every layer of one forward pass shares: positions, rotations, cache rows, the mask."""

    pos: torch.Tensor  # (B, T) position of each token
    rot: torch.Tensor  # (B, T, 1, D/2) complex rotations for those positions
    rows: torch.Tensor | slice  # cache row of each batch row: (B,) ids, or a slice if consecutive
    length: int  # cached positions any query can see: max(pos) + 1
    mask: torch.Tensor | None  # (B, 1, T, length) True where a query may attend; None = all

    @staticmethod
    def make(pos: torch.Tensor, rows: torch.Tensor | None, freqs: torch.Tensor) -> StepContext:
        B, T = pos.shape
        if rows is None:
            rows = slice(0, B)
        elif bool((rows == rows[0] + torch.arange(B, device=rows.device)).all()):
            rows = slice(int(rows[0]), int(rows[0]) + B)  # a view of the cache, not a gather
        angles = pos[..., None].float() * freqs  # (B, T, D/2)
        rot = torch.polar(torch.ones_like(angles), angles)[:, :, None]
        length = int(pos.max()) + 1
        mask = None
        if not (B == 1 and T == 1):  # one query at the newest position sees every cached key
            mask = (torch.arange(length, device=pos.device) <= pos[:, :, None])[:, None]
        return StepContext(pos, rot, rows, length, mask)


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of several projections of the same input,
    or None when they cannot be joined (e.g. packed weights of different quantization types)."""
    kinds = {type(lin) for lin in linears}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if hasattr(kind, "concat"):  # packed quantized layers know how to join themselves
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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One query per row. q: (B, H, 1, D); k, v: (B, Hkv, L, D); mask: (B, 1, 1, L)."""
    B, H, _, D = q.shape
    groups = q.view(B, k.shape[1], H // k.shape[1], D)  # query heads sharing each kv head
    scores = torch.matmul(groups, k.transpose(-1, -2)) * D ** -0.5  # (B, Hkv, G, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # set by fuse()
        self.cache: KVCache | None = None
        # causal attention of T > 1 queries over the cache, in place of SDPA (the C++ kernels'
        # for packed models): (q (B, T, H, D), cache k, cache v, rows (B,), pos (B, T)) -> like q
        self.cached_attention: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.wqkv is not None:  # fused: rotate the q and k heads in one call
            qkv = self.wqkv(x)
            qk = qkv[..., :q_size + kv_size].view(B, T, self.n_heads + self.n_kv_heads, -1)
            q, k = apply_rope(qk, ctx.rot).split((self.n_heads, self.n_kv_heads), dim=2)
            v = qkv[..., q_size + kv_size:]
        else:
            q = apply_rope(self.wq(x).view(B, T, self.n_heads, -1), ctx.rot)
            k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, -1), ctx.rot)
            v = self.wv(x)
        if self.cache is not None and self.cached_attention is not None and T > 1:
            self.cache.update(ctx.rows, ctx.pos, k.transpose(1, 2),
                              v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2),
                              ctx.length)
            out = self.cached_attention(q, self.cache.k, self.cache.v, row_ids(ctx.rows), ctx.pos)
            return self.wo(out.reshape(B, T, -1))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if self.cache is None:  # no cache: plain causal attention over the input
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            k, v = self.cache.update(ctx.rows, ctx.pos, k, v, ctx.length)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no copy unless the cache is narrower
            if T == 1 and ctx.mask is not None:  # batched decode: plain matmuls beat SDPA's
                out = decode_attention(q, k, v, ctx.mask)  # masked CPU kernel (~1.6x)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def fuse(self) -> None:
        """Replace wq, wk, wv by one projection (one matrix call instead of three); a loader may
        have set wqkv already."""
        if self.wqkv is None:
            self.wqkv = fuse_linears([self.wq, self.wk, self.wv])
        if self.wqkv is not None and hasattr(self, "wq"):
            del self.wq, self.wk, self.wv


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # set by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def fuse(self) -> None:
        """Replace w1 and w3 by one projection (or keep the one a loader set)."""
        if self.w13 is None:
            self.w13 = fuse_linears([self.w1, self.w3])
        if self.w13 is not None and hasattr(self, "w1"):
            del self.w1, self.w3


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
        # optional: all layers of a T = 1 step with a cache in one call (set by the GGUF loader)
        self.fast_decode: FusedDecoder | None = None
        # the KV cache's dtype when it is not the activations' (the packed GGUF path: float16)
        self.kv_dtype: torch.dtype | None = None

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache for `batch` rows of up to `max_len` positions, of `dtype` (default:
        kv_dtype if set, else the activations' dtype)."""
        dtype = dtype or self.cache_dtype
        if max_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the context window "
                             f"{self.args.max_seq_len}")
        device = self.rope_freqs.device
        self.drop_cache()  # first: never two caches at once
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, self.args.n_kv_heads, max_len,
                                            self.args.head_dim, dtype).to(device)

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def fuse_projections(self) -> None:
        """Fuse each layer's q/k/v and gate/up projections (inference speed; same results)."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()

    @property
    def cache_dtype(self) -> torch.dtype:
        """kv_dtype if set, else the activations' dtype (read off the final norm: the weights may
        be packed quantized blocks)."""
        return self.kv_dtype or self.norm.weight.dtype

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(rows, max_len) of the current cache, or None."""
        cache = self.layers[0].attention.cache
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def fused_step_fits(self, tokens: int | None = None) -> bool:
        """Whether the fused step (fast_decode, forward_tokens) can take `tokens` tokens now
        (None: a decode step, one token a sequence, however many sequences)."""
        return (self.fast_decode is not None
                and (tokens is None or tokens <= FUSED_PREFILL_TOKENS)
                and self.fast_decode.usable() and not torch.is_grad_enabled())

    def forward_tokens(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:
        """Logits (K, V) of the tokens `keep` (K indices) of one fused step over N tokens (N,):
        token i sits at position pos[i] of cache row rows[i]; every token's keys and values are
        written before any attends, each to its row's positions up to its own. So a decode step
        and new prompts (each prompt token one more row) go through the weights in one pass.
        Only where fused_step_fits."""
        h = self.fast_decode(self.tok_embeddings(tokens[:, None]), pos[:, None], rows)
        return self.output(self.norm(h[keep, 0])).float()

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
        h = self.tok_embeddings(tokens)
        if ((T == 1 and self.fused_step_fits())
                or (1 < T <= FUSED_PREFILL_LEN and self.fused_step_fits(B * T))):
            h = self.fast_decode(h, input_pos, cache_rows)
        else:
            ctx = StepContext.make(input_pos, cache_rows, self.rope_freqs)
            for layer in self.layers:
                h = layer(h, ctx)
        if output_index is not None:
            h = h[torch.arange(B, device=h.device), output_index]
        return self.output(self.norm(h)).float()
