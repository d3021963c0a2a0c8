"""Writing a tokenizer back out: the files of a Hugging Face model directory, or the
`tokenizer.*` metadata of a GGUF file, so that a model converted or trained here keeps its
vocabulary, special tokens and chat template in either world.

Byte-level BPE vocabularies (SmolLM2, GPT-2 style) are written as `tokenizer.json`, SentencePiece
ones (Llama 2) as `tokenizer.model`; both with a `tokenizer_config.json` that transformers'
AutoTokenizer and llamaherd read. tiktoken vocabularies (a Llama 3 `tokenizer.model`) travel as
the files they came in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFWriter

from .base import Tokenizer, TokenizerError
from .gguf_vocab import HF_PRE
from .hf import HFTokenizer
from .spm import CONTROL, SentencePieceTokenizer

CONFIG = "tokenizer_config.json"


def save_pretrained(tok: Tokenizer, directory: str | Path) -> list[Path]:
    """Write `tok` into a model directory; returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, HFTokenizer):
        path = directory / "tokenizer.json"
        path.write_text(_tokenizer_json(tok), encoding="utf-8")
        kind = "PreTrainedTokenizerFast"
    elif isinstance(tok, SentencePieceTokenizer):
        path = directory / "tokenizer.model"
        path.write_bytes(tok.proto.SerializeToString())
        kind = "LlamaTokenizer"
    else:
        raise TokenizerError(f"cannot write tokenizer files for a {type(tok).__name__} "
                             "vocabulary; copy the files it was read from")
    config = directory / CONFIG
    config.write_text(json.dumps(_config(tok, kind), indent=2, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    return [path, config]


def _text(tok: Tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tok.id_to_piece(token_id)


def _config(tok: Tokenizer, kind: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": kind,
        "bos_token": _text(tok, tok.bos_id), "eos_token": _text(tok, tok.eos_id),
        "unk_token": _text(tok, tok.unk_id), "pad_token": _text(tok, tok.pad_id),
        "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    return {k: v for k, v in config.items() if v is not None}


def _tokenizer_json(tok: HFTokenizer) -> str:
    """The `tokenizers` model with every special token registered as one (a GGUF vocabulary
    marks them in its token types, which `tokenizers` does not read) and, where the model wants
    one, BOS added by the post-processor."""
    tk = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])
    tk.add_special_tokens([tokenizers.AddedToken(text, special=True, normalized=False)
                           for text, _ in specials])
    moved = [text for text, i in specials if tk.token_to_id(text) != i]
    if moved:
        raise TokenizerError(f"special token {moved[0]!r} is not in the vocabulary")
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.id_to_piece(tok.bos_id)
        tk.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return tk.to_str(pretty=True)


def write_gguf_vocab(tok: Tokenizer, w: GGUFWriter) -> None:
    """The `tokenizer.*` keys of a GGUF file for `tok` (what gguf_vocab.from_metadata reads)."""
    if isinstance(tok, HFTokenizer):
        data = json.loads(tok.backend.to_str())
        pre = next((name for name, make in HF_PRE.items()
                    if json.loads(make().__getstate__()) == data.get("pre_tokenizer")), None)
        if data["model"].get("type") != "BPE" or pre is None:
            raise TokenizerError("only byte-level BPE vocabularies with a GPT-2 or SmolLM "
                                 "pre-tokenizer can be written into a GGUF file")
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list([tok.id_to_piece(i) for i in range(tok.vocab_size)])
        w.add_token_types([CONTROL if i in tok.special_ids else 1
                           for i in range(tok.vocab_size)])
        w.add_token_merges(merges)
    elif isinstance(tok, SentencePieceTokenizer):
        pieces = tok.proto.pieces
        w.add_tokenizer_model("llama")
        w.add_token_list([p.piece for p in pieces])
        w.add_token_scores([p.score for p in pieces])
        w.add_token_types([int(p.type) for p in pieces])
        w.add_add_space_prefix(tok.add_space_prefix)
    else:
        raise TokenizerError(f"cannot write a {type(tok).__name__} vocabulary into a GGUF file")
    for token_id, add in ((tok.bos_id, w.add_bos_token_id), (tok.eos_id, w.add_eos_token_id),
                          (tok.unk_id, w.add_unk_token_id), (tok.pad_id, w.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
