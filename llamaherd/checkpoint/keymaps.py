"""The one name map between llamaherd's (Meta's) parameter names and each checkpoint format's.

Layer-level names use `{i}` for the layer index. The only transform between layouts is the rotary
row permutation of Hugging Face checkpoints (see `hf_to_meta_rows` / `meta_to_hf_rows`).
"""

from __future__ import annotations

import re

import torch

# internal name -> name in (gguf, hf)
KEYMAP: dict[str, tuple[str, str]] = {
    "tok_embeddings.weight": ("token_embd.weight", "model.embed_tokens.weight"),
    "norm.weight": ("output_norm.weight", "model.norm.weight"),
    "output.weight": ("output.weight", "lm_head.weight"),
    "layers.{i}.attention.wq.weight": ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    "layers.{i}.attention.wk.weight": ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    "layers.{i}.attention.wv.weight": ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    "layers.{i}.attention.wo.weight": ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    "layers.{i}.feed_forward.w1.weight": ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    "layers.{i}.feed_forward.w2.weight": ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    "layers.{i}.feed_forward.w3.weight": ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "layers.{i}.attention_norm.weight": ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    "layers.{i}.ffn_norm.weight": ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
}
FORMATS = ("gguf", "hf")
# Scalar heads of reward and value models (LlamaForSequenceClassification's `score`; PPO's
# `value`): not part of the Transformer; a checkpoint keeps them aside (Checkpoint.heads), under
# the same name.
HEADS = {"score.weight", "value.weight"}
# Tensors a format may hold that are not model parameters (rotary tables, recomputed here).
IGNORED = {"gguf": {"rope_freqs.weight"}, "hf": set(), "meta": {"rope.freqs"}}


def _compile(fmt: str) -> list[tuple[re.Pattern[str], str]]:
    col = FORMATS.index(fmt)
    out = []
    for internal, names in KEYMAP.items():
        pattern = re.escape(names[col]).replace(r"\{i\}", r"(?P<i>\d+)")
        out.append((re.compile(pattern + "$"), internal))
    return out


_PATTERNS = {fmt: _compile(fmt) for fmt in FORMATS}


def to_internal(name: str, fmt: str) -> str | None:
    """Internal name for a format's tensor name, or None if the name is not a known parameter."""
    if fmt == "meta":
        return name
    for pattern, internal in _PATTERNS[fmt]:
        m = pattern.match(name)
        if m:
            return internal.replace("{i}", m.group("i")) if "i" in m.groupdict() else internal
    return None


def from_internal(name: str, fmt: str) -> str:
    """A format's tensor name for an internal name."""
    if fmt == "meta":
        return name
    col = FORMATS.index(fmt)
    m = re.match(r"layers\.(\d+)\.(.*)$", name)
    if m:
        return KEYMAP["layers.{i}." + m.group(2)][col].replace("{i}", m.group(1))
    return KEYMAP[name][col]


def is_rotary(internal: str) -> bool:
    """wq and wk rows are laid out for rotary embeddings and differ between Meta and HF."""
    return internal.endswith(("attention.wq.weight", "attention.wk.weight"))


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's rows as [first halves | second halves] (rotate-half form); Meta and
    GGUF interleave them as adjacent pairs. (out, in) -> (out, in)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)
