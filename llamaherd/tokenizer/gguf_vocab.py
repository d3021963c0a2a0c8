"""Tokenizers built from the vocabulary a GGUF file embeds (`tokenizer.ggml.*` metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from .base import Tokenizer, TokenizerError
from .bytelevel import unspell
from .hf import HFTokenizer
from .spm import CONTROL, UNKNOWN, USER_DEFINED, SentencePieceTokenizer, build_proto
from .tiktoken_bpe import LLAMA3_PATTERN, TiktokenTokenizer

# `tokenizer.ggml.pre` values whose vocabulary comes from tiktoken (Llama 3): encoded with tiktoken
# itself, ranks = token ids, since its merge order is by rank and whole-word tokens skip merging.
TIKTOKEN_PRE = {"llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN}


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer splits every digit off before GPT-2's byte-level regex (llama.cpp's
    # "smollm" pre-tokenizer applies the same two regexes in turn).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


# Other byte-level BPE pre-tokenizers, run through `tokenizers` with the GGUF's merges.
HF_PRE = {"default": _gpt2_pre, "gpt-2": _gpt2_pre, "gpt2": _gpt2_pre, "smollm": _smollm_pre}


def load_gguf(path: str | Path, metadata: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (vocab-only or full model).

    `metadata` may pass the file's already-parsed key/values; otherwise only the metadata is
    read, which takes milliseconds even for a 128k vocabulary."""
    from llamaherd.checkpoint.errors import CheckpointError
    from llamaherd.checkpoint.gguf import read_metadata

    if metadata is None:
        try:
            metadata = read_metadata(path)
        except CheckpointError as e:
            raise TokenizerError(str(e)) from e
    return from_metadata(metadata, source=str(path))


def from_metadata(meta: dict[str, Any], source: str = "") -> Tokenizer:
    """Build a tokenizer from `tokenizer.*` GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise TokenizerError(f"{source}: the GGUF file embeds no vocabulary (tokenizer.ggml.*)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    common = {
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"), "source": source,
    }
    if kind == "llama":
        return _sentencepiece(meta, tokens, types, ids, common)
    if kind == "gpt2":
        return _byte_bpe(meta, tokens, types, ids, common)
    raise TokenizerError(f"{source}: unsupported tokenizer.ggml.model {kind!r} "
                         "(supported: 'llama', 'gpt2')")


Meta = dict[str, Any]


def _sentencepiece(meta: Meta, tokens: list[str], types: list[int], ids: dict[str, int | None],
                   common: Meta) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = build_proto(
        tokens, scores, types, unk_id=ids["unknown"], bos_id=ids["bos"], eos_id=ids["eos"],
        pad_id=ids["padding"], add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
    )
    return SentencePieceTokenizer(
        proto, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), **common)


def _byte_bpe(meta: Meta, tokens: list[str], types: list[int], ids: dict[str, int | None],
              common: Meta) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    # a few hundred of ~50k-150k tokens: found by numpy rather than a Python loop over all
    marked = np.flatnonzero(np.isin(np.asarray(types), (CONTROL, UNKNOWN, USER_DEFINED)))
    special = {tokens[i]: int(i) for i in marked}
    # llama.cpp adds BOS for Llama 3 vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre in TIKTOKEN_PRE))
    kwargs = dict(
        special_tokens=special, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unknown"],
        pad_id=ids["padding"], add_bos=add_bos,
        extra_stop_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None], **common,
    )
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise TokenizerError(f"{common['source']}: add_space_prefix on a byte-level BPE "
                             "vocabulary is not supported")
    if pre in TIKTOKEN_PRE:
        special_ids = set(special.values())
        ranks: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if i in special_ids:
                continue
            raw = unspell(t)
            if raw is None:
                raise TokenizerError(f"{common['source']}: token {i} {t!r} is not byte-level")
            ranks[raw] = i
        return TiktokenTokenizer(ranks, pattern=TIKTOKEN_PRE[pre], **kwargs)
    if pre not in HF_PRE:
        raise TokenizerError(
            f"{common['source']}: unsupported pre-tokenizer {pre!r} (supported: "
            f"{', '.join(sorted([*TIKTOKEN_PRE, *HF_PRE]))})")
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise TokenizerError(f"{common['source']}: byte-level BPE vocabulary without merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = HF_PRE[pre]()
    tk.decoder = decoders.ByteLevel()
    return HFTokenizer(tk, **kwargs)
