"""Tokenizers for every Llama vocabulary source, behind one interface, plus `load()` to pick one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import StreamDecoder, Tokenizer, TokenizerError
from .chat import ChatFormat, ChatFormatError, Message, ParsedMessage, Tool, ToolCall

__all__ = [
    "ChatFormat",
    "ChatFormatError",
    "Message",
    "ParsedMessage",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "Tool",
    "ToolCall",
    "chat_format",
    "load",
    "resolve_path",
]

# A plain ChatML template for vocabularies with <|im_start|> but no template of their own.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Files `load` looks for in a directory, best first: Meta's tokenizer.model is the reference
# for Llama 3 (its tokenizer.json merges differ on some text), then tokenizer.json.
_DIR_FILES = ("tokenizer.model", "tokenizer.json")


def resolve_path(path: str | Path) -> Path:
    """A tokenizer/model path, or a registered name from `llamaherd.hub` (fetched on first use)."""
    p = Path(path)
    if p.exists():
        return p
    from llamaherd import hub

    if str(path) in hub.REGISTRY:
        return hub.resolve(str(path))
    raise TokenizerError(f"{path}: no such file, directory or registered model name")


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


def chat_format(tok: Tokenizer, template: str | None = None, kind: str | None = None,
                **options: Any) -> ChatFormat:
    """The chat format for `tok`.

    `kind` forces one: "jinja" (with `template` or the tokenizer's own), "llama2", "llama3"
    (plain 3.0), "llama3.1" or "chatml". Otherwise: an explicit `template`, else the template the
    tokenizer file carries, else by vocabulary: Llama 3 headers -> Llama 3.1 format (3.0 when the
    vocabulary lacks <|python_tag|>), <|im_start|> -> ChatML, <s>/</s> -> Llama 2. `options` go to
    the format (e.g. `today=` for Llama 3.1, template variables for Jinja).
    """
    from .llama_formats import Llama2ChatFormat, Llama3ChatFormat
    from .templates import JinjaChatFormat

    specials = tok.special_tokens
    if kind is None:
        if template is not None or tok.chat_template:
            kind = "jinja"
        elif "<|start_header_id|>" in specials:
            kind = "llama3.1" if "<|python_tag|>" in specials else "llama3"
        elif "<|im_start|>" in specials:
            kind = "chatml"
        elif tok.bos_id is not None and tok.eos_id is not None:
            kind = "llama2"
        else:
            raise ChatFormatError(f"{tok.source}: no chat template and no known chat vocabulary")
    if kind == "jinja":
        text = template if template is not None else tok.chat_template
        if not text:
            raise ChatFormatError(f"{tok.source}: the tokenizer has no chat template")
        return JinjaChatFormat(tok, text, **options)
    if kind == "chatml":
        return JinjaChatFormat(tok, CHATML_TEMPLATE, **options)
    if kind == "llama2":
        return Llama2ChatFormat(tok)
    if kind in ("llama3", "llama3.1"):
        return Llama3ChatFormat(tok, version="3" if kind == "llama3" else "3.1", **options)
    raise ChatFormatError(f"unknown chat format kind {kind!r} "
                          "(known: jinja, llama2, llama3, llama3.1, chatml)")
