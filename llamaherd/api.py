"""load() and the LLM object: the one front door for Python users."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamaherd import hub
from llamaherd.checkpoint import Checkpoint, load_checkpoint
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_path(name_or_path: str | Path) -> Path:
    """A registered model name (pulled on first use) or a path to a checkpoint."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in hub.REGISTRY:
        return hub.resolve(str(name_or_path))
    if "/" in str(name_or_path) or path.suffix:
        raise FileNotFoundError(f"{name_or_path}: no such file or directory")
    raise hub.HubError(f"unknown model name {str(name_or_path)!r}; known names: "
                       f"{', '.join(sorted(hub.REGISTRY))} (or pass a path)")


class LLM:
    """A loaded model with its tokenizer."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Any) -> None:
        self.checkpoint = checkpoint
        self.model: Transformer = checkpoint.model
        self.args: ModelArgs = checkpoint.args
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits of every position, shape [len(token_ids), vocab]; no cache involved."""
        if not token_ids:
            raise ValueError("token_ids is empty")
        if len(token_ids) > self.args.max_seq_len:
            raise ValueError(f"{len(token_ids)} tokens exceed the context window of "
                             f"{self.args.max_seq_len}")
        saved = [layer.attention.cache for layer in self.model.layers]
        self.model.drop_cache()
        try:
            return self.model(torch.tensor([token_ids]))[0].float()
        finally:
            for layer, cache in zip(self.model.layers, saved):
                layer.attention.cache = cache

    def __repr__(self) -> str:
        a = self.args
        return (f"LLM({self.checkpoint.path.name}, {self.checkpoint.format}, dim={a.dim}, "
                f"layers={a.n_layers}, vocab={a.vocab_size})")


def load(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None) -> LLM:
    """Load a registered name, a .gguf file, a Hugging Face directory or a Meta directory.

    dtype=None uses the fastest path for the checkpoint (packed quantized weights for GGUF);
    dtype="float32" always selects the exact float32 path.
    """
    from llamaherd import tokenizer as tok

    path = resolve_path(name_or_path)
    ckpt = load_checkpoint(path, dtype=_parse_dtype(dtype))
    tokenizer = tok.load(ckpt.path, metadata=ckpt.metadata if ckpt.format == "gguf" else None)
    return LLM(ckpt, tokenizer)
