"""Load any supported checkpoint (GGUF file, Hugging Face directory, Meta directory) into a Transformer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaherd.checkpoint.errors import CheckpointError
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer, rope_frequencies

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "check_shapes",
    "detect_format",
    "load_checkpoint",
]


# (a GGUF file's path, its metadata) -> its tokenizer, built by the caller's tokenizer library
ReadTokenizer = Callable[[Path, dict[str, Any]], Any]


@dataclass
class Checkpoint:
    model: Transformer
    args: ModelArgs
    format: str  # "gguf", "hf" or "meta"
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key/values, HF/Meta config
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    tokenizer: Any = None  # the file's own tokenizer, where the caller passed read_tokenizer
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. a reward model's score


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(path, "not a GGUF file (wrong magic number); for Hugging Face or "
                                    "Meta checkpoints pass the directory")
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        if (path / "params.json").exists():
            return "meta"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise CheckpointError(path, "directory has neither config.json (Hugging Face) nor "
                                    "params.json (Meta) nor a single .gguf file")
    raise CheckpointError(path, "no such file or directory")


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], path: Path,
                modules: dict[str, nn.Module] | None = None,
                packed_shapes: dict[str, tuple[int, ...]] | None = None) -> Transformer:
    """Make a Transformer from a full internal-name state dict without allocating twice.

    `modules` replaces whole sub-modules (for example packed quantized linears) by name; their
    weights are then absent from `state` and their shapes come in `packed_shapes`. Every tensor's
    shape is checked against the config before anything is assigned.
    """
    shapes = {name: tuple(t.shape) for name, t in state.items()} | (packed_shapes or {})
    with torch.device("meta"):
        model = Transformer(args)
    check_shapes(args, shapes, path, model)
    for name, module in (modules or {}).items():
        model.set_submodule(name, module)
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings and "output" not in (modules or {}):
        model.output.weight = model.tok_embeddings.weight
    model.rope_freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    return model.eval()


def check_shapes(args: ModelArgs, shapes: dict[str, tuple[int, ...]], path: Path,
                 model: Transformer | None = None) -> None:
    """Raise CheckpointError unless `shapes` (internal names) are exactly the parameters that
    `args` describes (the output projection absent when tied). `model`: a Transformer(args)
    already built (on the meta device), so none is built here."""
    if model is None:
        with torch.device("meta"):
            model = Transformer(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    for name, shape in shapes.items():
        if name not in expected:
            raise CheckpointError(path, f"unexpected tensor {name}")
        if shape != expected[name]:
            raise CheckpointError(path, f"tensor {name} has shape {shape}, the config "
                                        f"expects {expected[name]}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(path, f"missing tensor {missing[0]}"
                                    + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def resolve_tied(state: dict[str, torch.Tensor], args: ModelArgs, config: Path) -> ModelArgs:
    """Embeddings are tied when the output projection is absent, or is a copy of the embedding
    while the config says tied (the copy is then dropped). A config that claims tied weights
    over a different output projection is an error naming `config`."""
    embedding, output = state.get("tok_embeddings.weight"), state.get("output.weight")
    tied = output is None or (args.tie_embeddings and embedding is not None
                              and torch.equal(output, embedding))
    if args.tie_embeddings and not tied:
        raise CheckpointError(config, "the config ties the embeddings but the output projection "
                                      "differs from the token embedding")
    if tied:
        state.pop("output.weight", None)
    return args.replace(tie_embeddings=tied)


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None, packed: bool = False,
                    read_tokenizer: ReadTokenizer | None = None) -> Checkpoint:
    """Load a checkpoint. dtype: of the float weights (default float32). packed: a GGUF file's quantized tensors stay in
    their blocks (GGUFLinear layers) instead of being dequantized; ignored by the other formats,
    which hold no quantized tensors. read_tokenizer: a GGUF file's tokenizer is built from its
    metadata by read_tokenizer(path, metadata), before the weights (Checkpoint.tokenizer); other
    formats leave it None."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from llamaherd.checkpoint.gguf_load import load_gguf

        if path.is_dir():
            path = min(path.glob("*.gguf"))
        return load_gguf(path, dtype=dtype, packed=packed, read_tokenizer=read_tokenizer)
    if fmt == "hf":
        from llamaherd.checkpoint.hf import load_hf

        return load_hf(path, dtype=dtype)
    from llamaherd.checkpoint.meta import load_meta

    return load_meta(path, dtype=dtype)
