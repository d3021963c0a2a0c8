"""Convert a model between GGUF, Hugging Face and Meta layouts, weights and vocabulary both."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llamaherd import tokenizer as tok
from llamaherd.checkpoint import Checkpoint, load_checkpoint
from llamaherd.checkpoint.errors import CheckpointError
from llamaherd.checkpoint.gguf import read_gguf
from llamaherd.checkpoint.gguf_write import WEIGHT_TYPES, write_gguf
from llamaherd.checkpoint.hf import save_hf
from llamaherd.checkpoint.meta import save_meta
from llamaherd.config import ModelArgs
from llamaherd.hub import resolve_path
from llamaherd.model import rope_frequencies
from llamaherd.tokenizer.save import save_pretrained, write_gguf_vocab

FORMATS = ("hf", "meta", "gguf")
# Tokenizer files of HF and Meta directories, copied unchanged between them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja")


def convert(src: str | Path, dst: str | Path, fmt: str, *, gguf_type: str = "F32") -> Path:
    """Load `src` (a registered name, a GGUF file, an HF or Meta directory) in float32 and write
    it to `dst` as `fmt`: "hf" (a directory: config.json, model.safetensors), "meta" (a
    directory: params.json, consolidated.00.pth) or "gguf" (a file; weight matrices stored as
    `gguf_type`: F32, F16, BF16, Q8_0, Q4_1 or Q4_0).

    The vocabulary and chat template go along: a GGUF source's metadata into a GGUF output, or
    written as tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json) into a
    directory; a directory's tokenizer files copied into a directory, or written as GGUF
    metadata. A source without a vocabulary gives an output without one.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if gguf_type.upper() not in WEIGHT_TYPES:
        raise ValueError(f"unsupported GGUF type {gguf_type!r}; choose one of "
                         f"{', '.join(WEIGHT_TYPES)}")
    ckpt = load_checkpoint(resolve_path(src), dtype=torch.float32)
    dst = Path(dst)
    if fmt == "gguf":
        if dst.is_dir():
            dst = dst / "model.gguf"
        if ckpt.format == "gguf":
            return write_gguf(ckpt.model, dst, weight_type=gguf_type.upper(),
                              source=read_gguf(ckpt.path))
        vocabulary = _vocabulary(ckpt)
        add = None if vocabulary is None else (lambda w: write_gguf_vocab(vocabulary, w))
        return write_gguf(ckpt.model, dst, weight_type=gguf_type.upper(), add_metadata=add)
    _check_expressible(ckpt, fmt)
    state = ckpt.model.state_dict()
    out = save_hf(state, ckpt.args, dst) if fmt == "hf" else save_meta(state, ckpt.args, dst)
    write_vocabulary(ckpt, out)
    return out


def write_vocabulary(ckpt: Checkpoint, out: Path, tokenizer: tok.Tokenizer | None = None) -> None:
    """The checkpoint's vocabulary as tokenizer files in the directory `out`: a directory's own
    files copied, a GGUF's written from its metadata (`tokenizer`: already loaded)."""
    if ckpt.path.is_dir():
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file() and ckpt.path.resolve() != out.resolve():
                shutil.copyfile(ckpt.path / name, out / name)
        return
    vocabulary = tokenizer if tokenizer is not None else _vocabulary(ckpt)
    if vocabulary is not None:
        save_pretrained(vocabulary, out)


def _vocabulary(ckpt: Checkpoint) -> tok.Tokenizer | None:
    """The checkpoint's tokenizer, or None where it has none (a bare GGUF or directory)."""
    has = (ckpt.path.is_file() and "tokenizer.ggml.tokens" in ckpt.metadata) or (
        ckpt.path.is_dir() and any((ckpt.path / n).is_file() for n in TOKENIZER_FILES))
    return tok.load(ckpt.path) if has else None


def _check_expressible(ckpt: Checkpoint, fmt: str) -> None:
    """Refuse to write a config that would load as a different model."""
    args = ckpt.args
    if fmt == "hf":
        back = ModelArgs.from_hf_config(args.to_hf_config())
    else:
        back = ModelArgs.from_params_json(args.to_params_json())
    expected = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    if not torch.equal(ckpt.model.rope_freqs.cpu(), expected):
        raise CheckpointError(ckpt.path, "its rotary frequencies follow no Llama 3.1 scaling, "
                                         f"which a {fmt} config cannot express")
    if back != args:
        changed = [f for f in args.__dataclass_fields__ if getattr(back, f) != getattr(args, f)]
        raise CheckpointError(ckpt.path, f"a {fmt} config cannot express this model's "
                                         f"{', '.join(changed)}")
