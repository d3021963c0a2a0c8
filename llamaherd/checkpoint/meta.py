"""Meta checkpoint directories: params.json and consolidated.NN.pth shards, read safely, written."""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from llamaherd.checkpoint import Checkpoint, build_model, resolve_tied
from llamaherd.checkpoint.errors import CheckpointError
from llamaherd.checkpoint.keymaps import IGNORED
from llamaherd.config import ModelArgs

_SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
# Model-parallel layout of Meta's reference code: column-parallel layers are split by output rows
# (dim 0), row-parallel layers by input columns (dim 1), norms are replicated.
_ROWS_SPLIT = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
               "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_COLUMNS_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight")
_TYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth, .01, ... in order; a gap in the numbering is an error."""
    found = {int(m.group(1)): p for p in path.glob("consolidated.*.pth")
             if (m := _SHARD.match(p.name))}
    if not found:
        raise CheckpointError(path, "no consolidated.NN.pth files next to params.json")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        have = ", ".join(f"{i:02d}" for i in sorted(found))
        raise CheckpointError(path / f"consolidated.{missing[0]:02d}.pth",
                              f"missing shard (found shards {have})")
    return [found[i] for i in sorted(found)]


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """One shard's tensors, memory-mapped. Only tensors are unpickled: anything else in the file
    (a class instance, a function call) is refused before it can run."""
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # the pre-1.6 (non-zip) format cannot be mapped; still read with weights_only
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        forbidden = re.search(r"GLOBAL ([\w.]+)", str(e))
        if forbidden:
            raise CheckpointError(file, f"refusing to unpickle: the file holds Python objects "
                                        f"other than tensors ({forbidden.group(1)})") from None
        reason = str(e).strip().split("\n")[0].split(". ")[0] or type(e).__name__
        raise CheckpointError(file, f"not a readable PyTorch checkpoint: {reason}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(file, "expected a dict of tensor names to tensors")
    return sd


def type_name(dtype: torch.dtype) -> str:
    """A tensor type named as GGUF and safetensors name it: F32, F16, BF16, ..."""
    return _TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.").upper())


def concat_dim(name: str, shard_shape: tuple[int, ...], dim: int) -> int | None:
    """The dimension model-parallel shards of `name` are concatenated along; None if replicated.

    The embedding is the one parameter whose split changed: Llama 2 splits the embedding width
    (ParallelEmbedding, dim 1), Llama 3 the vocabulary (VocabParallelEmbedding, dim 0). A shard
    of full width `dim` was therefore split by vocabulary.
    """
    if name.endswith(_ROWS_SPLIT):
        return 0
    if name.endswith(_COLUMNS_SPLIT):
        return 1
    if name == "tok_embeddings.weight":
        return 0 if shard_shape[1] == dim else 1
    return None


def read_params(path: Path) -> dict[str, Any]:
    file = path / "params.json"
    try:
        params = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(file, f"cannot read: {e}") from None
    if not isinstance(params, dict) or "dim" not in params:
        raise CheckpointError(file, "not a Llama params.json (no 'dim')")
    return params


def args_from_params(path: Path, params: dict[str, Any], vocab_size: int) -> ModelArgs:
    try:
        return ModelArgs.from_params_json(params, vocab_size=vocab_size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path / "params.json", f"bad params: {e}") from None


def load_meta(path: Path, *, dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a Meta directory, merging model-parallel shards. dtype None keeps float32."""
    params = read_params(path)
    files = shard_files(path)
    shards = [read_shard(f) for f in files]
    dtype = dtype or torch.float32
    types = Counter(type_name(t.dtype) for t in shards[0].values())
    state: dict[str, torch.Tensor] = {}
    for name, first in shards[0].items():
        if name in IGNORED["meta"]:
            continue
        parts = [first]
        for file, shard in zip(files[1:], shards[1:]):
            if name not in shard:
                raise CheckpointError(file, f"missing tensor {name} (present in {files[0].name})")
            parts.append(shard[name])
        d = concat_dim(name, tuple(first.shape), int(params["dim"]))
        t = first if d is None or len(parts) == 1 else torch.cat(parts, dim=d)
        state[name] = t.to(dtype)
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(files[0], "missing tensor tok_embeddings.weight")
    args = args_from_params(path, params, state["tok_embeddings.weight"].shape[0])
    args = resolve_tied(state, args, path / "params.json")
    model = build_model(args, state, path)
    return Checkpoint(model, args, "meta", path, params, dict(types))


def save_meta(state: dict[str, torch.Tensor], args: ModelArgs, dst: Path) -> Path:
    """Write params.json and a single consolidated.00.pth. A tied output projection is saved as
    the same tensor as the embedding (stored once), so Meta's reference code can load it too."""
    dst.mkdir(parents=True, exist_ok=True)
    out = {name: t.contiguous() for name, t in state.items()}
    if args.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    (dst / "params.json").write_text(json.dumps(args.to_params_json(), indent=2) + "\n")
    torch.save(out, dst / "consolidated.00.pth")
    return dst
