"""Tokenizers for every Llama vocabulary source, behind one interface, plus `load()` to pick one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerError", "load", "resolve_path"]

# Files `load` looks for in a directory, best first: Meta's tokenizer.model is the reference
# for Llama 3 (its tokenizer.json merges differ on some text), then tokenizer.json.
_DIR_FILES = ("tokenizer.model", "tokenizer.json")


def resolve_path(path: str | Path) -> Path:
    """A tokenizer/model path, or a registered name from `llamaherd.hub` (fetched on first use)."""
    from llamaherd import hub

    try:
        return hub.resolve_path(path)
    except (FileNotFoundError, hub.HubError) as e:
        raise TokenizerError(str(e)) from None


def _pick_in_dir(d: Path) -> Path:
    for name in _DIR_FILES:
        if (d / name).is_file():
            return d / name
    ggufs = sorted(d.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = "several .gguf files" if ggufs else "none"
    raise TokenizerError(f"{d}: expected tokenizer.model, tokenizer.json or one .gguf file ({found})")


def load(path: str | Path, *, metadata: dict[str, Any] | None = None) -> Tokenizer:
    """Load the tokenizer in `path`: a vocab-only or full `.gguf`, a `tokenizer.model` (tiktoken
    rank file or SentencePiece protobuf, told apart by content), a `tokenizer.json`, a directory
    holding one of those, or a registered model name. `metadata` may pass a GGUF file's
    already-parsed key/values (`llamaherd.checkpoint.gguf.read_metadata`) so it is not read twice."""
    from .gguf_vocab import load_gguf
    from .hf import config_chat_template, load_tokenizer_json, read_config
    from .spm import load_model_file
    from .tiktoken_bpe import is_rank_file, load_llama3_model

    p = resolve_path(path)
    if p.is_dir():
        p = _pick_in_dir(p)
    try:
        with open(p, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise TokenizerError(f"{p}: cannot read ({e.strerror})") from e
    if not head:
        raise TokenizerError(f"{p}: empty file")
    if head.startswith(b"GGUF"):
        return load_gguf(p, metadata=metadata)
    if p.suffix == ".json" or head.lstrip().startswith(b"{"):
        return load_tokenizer_json(p)
    config = read_config(p)
    template = config_chat_template(config)
    if is_rank_file(head):
        return load_llama3_model(p, chat_template=template)
    return load_model_file(p, add_bos=bool(config.get("add_bos_token", True)),
                           chat_template=template)
