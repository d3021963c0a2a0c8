"""GPT-2's byte-level alphabet: how byte-level BPE vocabularies spell raw bytes as printable text."""

from __future__ import annotations


def _byte_to_char() -> list[str]:
    # Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order, to
    # code points from 256 upwards (so a space 0x20 is spelled 'Ġ' U+0120 and '\n' is 'Ċ').
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_to_char()
_SPELL = {b: c for b, c in enumerate(BYTE_TO_CHAR)}
# char -> Latin-1 char of its byte; characters outside the alphabet map to one that cannot encode.
_UNSPELL = {b: "\uffff" for b in range(256)}
_UNSPELL.update({ord(c): chr(b) for b, c in enumerate(BYTE_TO_CHAR)})


def spell(data: bytes) -> str:
    """Raw bytes -> the byte-level spelling used in vocab files ('Ġthe' for b' the')."""
    return "".join(_SPELL[b] for b in data)


def unspell(piece: str) -> bytes | None:
    """A byte-level spelling -> raw bytes, or None if `piece` uses characters outside the alphabet
    (then it is not a byte-level token but literal text, e.g. a special token)."""
    raw = piece.translate(_UNSPELL)
    try:
        return raw.encode("latin-1")
    except UnicodeEncodeError:
        return None
