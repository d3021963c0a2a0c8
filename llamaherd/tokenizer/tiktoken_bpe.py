"""tiktoken-style byte BPE (Llama 3): rank files, the Llama 3 specials, and the tokenizer class."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from .base import Tokenizer, TokenizerError
from .bytelevel import spell

# Llama 3's pre-tokenizer (SPECS.md §3).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE_TOKENS = 128000
LLAMA3_NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """The 256 special token names of Llama 3.1/3.2, in id order from 128000."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(2, 2 + LLAMA3_NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


def is_rank_file(head: bytes) -> bool:
    """True if `head` (a file's first bytes) looks like a tiktoken rank file: 'base64 rank' lines."""
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file (one 'base64-token rank' pair a line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise TokenizerError(f"{path}: line {lineno} is not 'base64 rank'") from e
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Byte BPE where a merge's priority is the rank of the token it makes (token id = rank)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 pattern: str = LLAMA3_PATTERN, **kwargs) -> None:
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise TokenizerError(f"byte BPE vocabulary lacks single-byte token 0x{missing[0]:02X}")
        self._ranks = mergeable_ranks
        self._enc = tiktoken.Encoding(
            name="llamaherd", pat_str=pattern, mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
        )
        vocab_size = max([*mergeable_ranks.values(), *special_tokens.values()]) + 1
        super().__init__(vocab_size=vocab_size, special_tokens=special_tokens, **kwargs)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        try:
            if allow_special:  # tiktoken splits out special tokens natively
                ids = self._enc.encode(text, allowed_special="all", disallowed_special=())
            else:
                ids = self._enc.encode_ordinary(text)
        except TypeError as e:
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}") from e
        return self._wrap(ids, bos, eos) if bos or eos else ids

    def _iter_pieces(self) -> Iterator[tuple[str, bytes]]:
        data = [b""] * self.vocab_size
        for token, rank in self._ranks.items():
            data[rank] = token
        specials = {tid: text for text, tid in self.special_tokens.items()}
        for i, piece in enumerate(data):
            text = specials.get(i)
            yield (text, text.encode("utf-8")) if text is not None else (spell(piece), piece)


def load_llama3_model(path: str | Path, chat_template: str | None = None) -> TiktokenTokenizer:
    """Meta's Llama 3 `tokenizer.model`: 128000 ranks plus the 256 Llama 3 special tokens."""
    ranks = read_rank_file(path)
    base = len(ranks)
    specials = {name: base + i for i, name in enumerate(llama3_special_tokens())}
    return TiktokenTokenizer(
        ranks, specials, pattern=LLAMA3_PATTERN,
        bos_id=specials["<|begin_of_text|>"], eos_id=specials["<|end_of_text|>"],
        pad_id=specials["<|finetune_right_pad_id|>"], add_bos=True,
        chat_template=chat_template, source=str(path),
    )
