"""The one tokenizer interface every vocabulary source implements, and its streaming decoder."""

from __future__ import annotations

import codecs
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property

# Tokens that end a turn or the text in the Llama family and its ChatML relatives.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>",
)


class TokenizerError(Exception):
    """A tokenizer file is missing or unreadable, or a tokenizer was used wrongly."""


class Tokenizer:
    """Text <-> token ids for one vocabulary.

    Subclasses supply `encode_ordinary` (text with no special-token parsing) and `_iter_pieces`
    (each token's spelling in the vocabulary and its bytes). Everything else lives here, so every
    source (GGUF, tiktoken, SentencePiece, tokenizer.json) behaves the same way.
    """

    # SentencePiece vocabularies add a space before the text and drop it again when decoding.
    strips_leading_space: bool = False

    def __init__(
        self,
        *,
        vocab_size: int,
        special_tokens: dict[str, int],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        unk_id: int | None = None,
        pad_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        source: str = "",
    ) -> None:
        self.vocab_size = vocab_size
        self.special_tokens = dict(special_tokens)  # text -> id, for control/added tokens
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.unk_id = unk_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.source = source
        self.special_ids: set[int] = set(self.special_tokens.values())
        stops = {self.special_tokens[t] for t in END_OF_TURN_TOKENS if t in self.special_tokens}
        stops.update(i for i in (eos_id, *extra_stop_ids) if i is not None)
        self.stop_ids: set[int] = stops
        # Longest first, so "<|eot_id|>" wins over any shorter token that is its prefix.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, source={self.source!r})"

    @property
    def special_pattern(self) -> re.Pattern[str] | None:
        """A regex matching any special token's text (longest first), None if there are none."""
        return self._special_re

    # ---- what a subclass provides -------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids for `text` with special-token strings treated as plain text (no BOS/EOS)."""
        raise NotImplementedError

    def _iter_pieces(self) -> Iterator[tuple[str, bytes]]:
        """(spelling, bytes) of every id in order; special tokens' bytes are their text."""
        raise NotImplementedError

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Token ids for `text`. Special-token strings in `text` become special tokens only when
        `allow_special` is set; otherwise they are encoded as the plain text they are."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        ids = self._encode_trusted([(text, True)]) if allow_special else self.encode_ordinary(text)
        return self._wrap(ids, bos, eos) if bos or eos else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt, with the BOS token first when the model expects one
        (add_bos); special-token strings in `text` stay plain text."""
        return self.encode(text, bos=self.add_bos)

    def encode_segments(self, segments: Sequence[tuple[str, bool]], bos: bool = False,
                        eos: bool = False) -> list[int]:
        """Encode the concatenation of `(text, trusted)` segments as one text, where special-token
        strings become special tokens only inside trusted segments.

        Chat formats use this: the template's own structure is trusted, message content is not,
        and the result is exactly what encoding the whole rendered prompt would give, except that
        nothing a user typed can turn into a control token.
        """
        return self._wrap(self._encode_trusted(segments), bos, eos)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise TokenizerError("this vocabulary has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise TokenizerError("this vocabulary has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _encode_trusted(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        text = "".join(t for t, _ in segments)
        # Special-token matches that lie entirely inside one trusted segment.
        cuts: list[tuple[int, int, int]] = []
        if self._special_re is not None:
            pos = 0
            for seg, trusted in segments:
                end = pos + len(seg)
                if trusted and seg:
                    for m in self._special_re.finditer(seg):
                        cuts.append((pos + m.start(), pos + m.end(), self.special_tokens[m.group()]))
                pos = end
        # The text between special tokens is encoded chunk by chunk (as llama.cpp and Hugging Face
        # do: a SentencePiece vocabulary adds its space prefix again after each special token).
        ids: list[int] = []
        pos = 0
        for start, end, tid in cuts:
            if start > pos:
                ids += self.encode_ordinary(text[pos:start])
            ids.append(tid)
            pos = end
        if pos < len(text):
            ids += self.encode_ordinary(text[pos:])
        return ids

    # ---- decoding ----------------------------------------------------------------------------
    @cached_property
    def _pieces(self) -> tuple[PackedStrings, PackedStrings]:
        """(UTF-8 spelling, bytes) of every id, packed: ~1 MB where 2 x 49k Python objects take
        ~5 MB for the default model's vocabulary."""
        names, data = PackedStrings(), PackedStrings()
        for name, piece in self._iter_pieces():  # one pair at a time: no 2 x 49k objects at once
            names.append(name.encode("utf-8"))
            data.append(piece)
        return names, data

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is out of range for vocab size {self.vocab_size}")
        return ids

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The raw bytes the tokens stand for (may end inside a UTF-8 character)."""
        table = self._pieces[1]
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`; special tokens appear as their text unless `skip_special`. Invalid
        UTF-8 (a lone byte token, a cut character) becomes U+FFFD. Like SentencePiece, a
        vocabulary that adds a space prefix drops it again at the start."""
        dec = self.stream_decoder(skip_special=skip_special, start_of_text=True)
        return "".join(map(dec.push, ids)) + dec.flush()

    def stream_decoder(self, skip_special: bool = False, start_of_text: bool = False) -> StreamDecoder:
        """An incremental decoder for streamed ids that never splits a UTF-8 character.

        `start_of_text=True` decodes like `decode` (dropping a SentencePiece space prefix); the
        default suits text generated after a prompt, where that space is a real space."""
        return StreamDecoder(self, skip_special, strip_space=start_of_text and self.strips_leading_space)

    # ---- lookups -----------------------------------------------------------------------------
    @cached_property
    def _piece_to_id(self) -> dict[str, int]:
        return {p.decode("utf-8"): i for i, p in enumerate(self._pieces[0])}

    def token_to_id(self, text: str) -> int | None:
        """The id of a special token's text, or of a piece as the vocabulary spells it."""
        tid = self.special_tokens.get(text)
        return tid if tid is not None else self._piece_to_id.get(text)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary's own spelling of a token (e.g. 'Ġthe', '▁the', '<0x0A>', '<|eot_id|>')."""
        return self._pieces[0][self._check_ids([token_id])[0]].decode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


class PackedStrings(Sequence[bytes]):
    """A sequence of short byte strings kept in one buffer, with their end offsets."""

    def __init__(self) -> None:
        self._ends = array("Q")
        self._blob = bytearray()

    def append(self, item: bytes) -> None:
        self._blob += item
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]  # no slices
        if i < 0:
            i += len(self._ends)
        return bytes(self._blob[self._ends[i - 1] if i else 0:self._ends[i]])


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tok: Tokenizer, skip_special: bool, strip_space: bool) -> None:
        self._tok = tok
        self._skip_special = skip_special
        self._strip_space = strip_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return whatever text is now complete (possibly '')."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tok.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range for vocab size "
                                 f"{self._tok.vocab_size}")
        special = token_id in self._tok.special_ids
        if special and self._skip_special:
            return ""
        data = self._tok._pieces[1][token_id]
        if self._strip_space and not special:
            self._strip_space = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Text for any bytes still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
