"""SentencePiece vocabularies (Llama 2): from a `tokenizer.model` file or from GGUF pieces/scores/types."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from .base import Tokenizer, TokenizerError

# SentencePiece piece types, numbered as in its ModelProto and in GGUF `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # '▁', SentencePiece's visible space


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; special tokens are its control, unknown and user-defined pieces.

    The space prefix is added here rather than by SentencePiece, so that text after a special
    token gets it too (as llama.cpp and Hugging Face's Llama tokenizer do).
    """

    def __init__(self, proto: pb.ModelProto, *, add_bos: bool, add_eos: bool = False,
                 chat_template: str | None = None, source: str = "") -> None:
        self.proto = proto  # the model as given (written back out by tokenizer.save)
        norm = proto.normalizer_spec
        self.add_space_prefix = norm.add_dummy_prefix
        self.strips_leading_space = norm.add_dummy_prefix
        # With whitespace collapsing a leading ' ' would be removed again: let SentencePiece prefix.
        self._manual_prefix = norm.add_dummy_prefix and not norm.remove_extra_whitespaces
        if self._manual_prefix:
            proto = _copy(proto)
            proto.normalizer_spec.add_dummy_prefix = False
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._proto_pieces = [(p.piece, p.type) for p in proto.pieces]
        specials = {p: i for i, (p, t) in enumerate(self._proto_pieces)
                    if t in (CONTROL, UNKNOWN, USER_DEFINED)}

        def known(i: int) -> int | None:
            return i if i >= 0 else None

        super().__init__(
            vocab_size=len(self._proto_pieces), special_tokens=specials,
            bos_id=known(self._sp.bos_id()), eos_id=known(self._sp.eos_id()),
            unk_id=known(self._sp.unk_id()), pad_id=known(self._sp.pad_id()),
            add_bos=add_bos, add_eos=add_eos, chat_template=chat_template, source=source,
        )

    def encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        if self._manual_prefix:
            text = " " + text
        return self._sp.encode(text)

    def _iter_pieces(self) -> Iterator[tuple[str, bytes]]:
        for piece, kind in self._proto_pieces:
            if kind == BYTE:
                yield piece, bytes([int(piece[3:5], 16)])  # '<0x0A>' -> b'\n'
            elif kind == NORMAL or kind == USER_DEFINED:
                yield piece, piece.replace(SPACE, " ").encode("utf-8")
            else:
                yield piece, piece.encode("utf-8")


def _copy(proto: pb.ModelProto) -> pb.ModelProto:
    out = pb.ModelProto()
    out.CopyFrom(proto)
    return out


def build_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                unk_id: int | None, bos_id: int | None, eos_id: int | None,
                pad_id: int | None = None, add_space_prefix: bool = True) -> pb.ModelProto:
    """A Llama-2-style SentencePiece BPE model (identity normalization, whitespace kept, byte
    fallback) from a vocabulary's pieces, scores and token types."""
    if not (len(pieces) == len(scores) == len(types)):
        raise TokenizerError("pieces, scores and token types differ in length")
    proto = pb.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        item = proto.pieces.add()
        item.piece, item.score = piece, float(score)
        item.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) \
            else NORMAL
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = any(t == BYTE for t in types)
    for name, value in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
        setattr(spec, f"{name}_id", -1 if value is None else value)
        if value is not None:
            setattr(spec, f"{name}_piece", pieces[value])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def load_model_file(path: str | Path, add_bos: bool = True,
                    chat_template: str | None = None) -> SentencePieceTokenizer:
    """A SentencePiece `tokenizer.model` (protobuf), e.g. Llama 2's."""
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
    if not proto.pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model (no pieces)")
    return SentencePieceTokenizer(proto, add_bos=add_bos, chat_template=chat_template,
                                  source=str(path))
