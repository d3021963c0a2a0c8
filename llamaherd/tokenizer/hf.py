"""Tokenizers backed by Hugging Face `tokenizers`: `tokenizer.json` files and GGUF byte-level BPE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers

from .base import Tokenizer, TokenizerError
from .bytelevel import unspell
from .spm import SPACE


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind the common interface.

    Its own special-token matching is switched off (`encode_special_tokens`), so ordinary encoding
    never produces a control token; `Tokenizer.encode` handles `allow_special` for every source.
    """

    def __init__(self, tk: tokenizers.Tokenizer, *, special_tokens: dict[str, int] | None = None,
                 **kwargs: Any) -> None:
        tk.encode_special_tokens = True
        self.backend = tk  # the `tokenizers.Tokenizer`
        if special_tokens is None:
            special_tokens = {t.content: i for i, t in tk.get_added_tokens_decoder().items()
                              if t.special}
        decoder = tk.decoder.__getstate__().decode() if tk.decoder is not None else ""
        self._byte_level = '"ByteLevel"' in decoder
        self.strips_leading_space = '"Strip"' in decoder or (
            '"Metaspace"' in decoder and '"never"' not in decoder)
        super().__init__(vocab_size=tk.get_vocab_size(with_added_tokens=True),
                         special_tokens=special_tokens, **kwargs)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _iter_pieces(self) -> Iterator[tuple[str, bytes]]:
        for i in range(self.vocab_size):
            piece = self.backend.id_to_token(i) or ""
            yield piece, self._piece_bytes(piece, i in self.special_ids)

    def _piece_bytes(self, piece: str, special: bool) -> bytes:
        if special:
            return piece.encode("utf-8")
        if self._byte_level:
            raw = unspell(piece)
            return raw if raw is not None else piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # byte-fallback token
        return piece.replace(SPACE, " ").encode("utf-8")


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json beside a tokenizer file, or {} when there is none."""
    cfg = path.parent / "tokenizer_config.json" if path.is_file() else path / "tokenizer_config.json"
    if not cfg.exists():
        return {}
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{cfg}: not valid JSON ({e})") from e


def config_chat_template(config: dict[str, Any]) -> str | None:
    """The chat template in a tokenizer_config.json (a string, or a list of named templates)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer_json(path: str | Path) -> HFTokenizer:
    """A Hugging Face `tokenizer.json`, with bos/eos/chat template from tokenizer_config.json."""
    path = Path(path)
    try:
        tk = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"{path}: not a tokenizer.json ({e})") from e
    config = read_config(path)

    def token_id(key: str) -> int | None:
        text = _token_text(config.get(key))
        return tk.token_to_id(text) if text is not None else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # not stated: see whether the post-processor inserts BOS
        probe = tk.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
    return HFTokenizer(
        tk, bos_id=bos_id, eos_id=eos_id, unk_id=token_id("unk_token"),
        pad_id=token_id("pad_token"), add_bos=bool(add_bos),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=config_chat_template(config), source=str(path),
    )
