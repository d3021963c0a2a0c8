"""Hugging Face checkpoint directories: config.json and safetensors, read memory-mapped, written."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llamaherd.checkpoint import Checkpoint, build_model, resolve_tied
from llamaherd.checkpoint.errors import CheckpointError
from llamaherd.checkpoint.keymaps import (
    HEADS,
    IGNORED,
    from_internal,
    hf_to_meta_rows,
    is_rotary,
    meta_to_hf_rows,
    to_internal,
)
from llamaherd.config import ModelArgs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(path: Path) -> tuple[dict[str, Any], ModelArgs]:
    """config.json as a dict and as ModelArgs."""
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        return cfg, ModelArgs.from_hf_config(cfg)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(cfg_file, f"cannot read: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(cfg_file, f"not a Llama config: {e}") from None


def tensor_files(path: Path) -> dict[str, Path]:
    """Each tensor name -> the safetensors file holding it (one file, or the shards of an index)."""
    if (path / INDEX_FILE).exists():
        index_file = path / INDEX_FILE
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(index_file, f"not a safetensors index: {e}") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(shard, f"missing shard named in {INDEX_FILE}")
        return files
    if (path / SINGLE_FILE).exists():
        with open_safetensors(path / SINGLE_FILE) as f:
            return {name: path / SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    for name in PICKLE_FILES:
        if (path / name).exists():
            raise CheckpointError(path / name, "refusing to unpickle a PyTorch .bin checkpoint "
                                               "(it can run arbitrary code); convert it to "
                                               "safetensors")
    raise CheckpointError(path, f"no {SINGLE_FILE} or {INDEX_FILE} in the directory")


def open_safetensors(file: Path) -> Any:
    """A safetensors file opened memory-mapped (safe_open), or a CheckpointError."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(file, f"not a readable safetensors file: {e}") from None


def load_hf(path: Path, *, dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a Hugging Face LlamaForCausalLM directory. The tensors stay memory-mapped from the
    safetensors files where no conversion is needed. dtype None keeps float32."""
    cfg, args = read_config(path)
    files = tensor_files(path)
    dtype = dtype or torch.float32
    state: dict[str, torch.Tensor] = {}
    scalar_heads: dict[str, torch.Tensor] = {}
    types: Counter[str] = Counter()
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, OSError) as e:  # a truncated or inconsistent shard
                    raise CheckpointError(file, f"cannot read tensor {name}: {e}") from None
                types[f.get_slice(name).get_dtype()] += 1  # "F32", "BF16", ...
                if name in IGNORED["hf"]:
                    continue
                if name in HEADS:
                    scalar_heads[name] = t.to(dtype)
                    continue
                internal = to_internal(name, "hf")
                if internal is None:
                    raise CheckpointError(file, f"unexpected tensor {name}")
                if is_rotary(internal):
                    heads = args.n_heads if internal.endswith("wq.weight") else args.n_kv_heads
                    if t.dim() != 2 or t.shape[0] != heads * args.head_dim:
                        raise CheckpointError(file, f"tensor {name} has shape {tuple(t.shape)}, "
                                                    f"the config expects {heads * args.head_dim} "
                                                    "rows")
                    t = hf_to_meta_rows(t, heads)
                state[internal] = t.to(dtype)
    args = resolve_tied(state, args, path / "config.json")
    model = build_model(args, state, path)
    return Checkpoint(model, args, "hf", path, cfg, dict(types), heads=scalar_heads)


def save_hf(state: dict[str, torch.Tensor], args: ModelArgs, dst: Path) -> Path:
    """Write config.json and model.safetensors (wq/wk rows back in rotate-half order; lm_head
    left out when the embeddings are tied, as transformers expects). A state with a score head
    is written as a LlamaForSequenceClassification (a reward or value model)."""
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    config = args.to_hf_config()
    for internal, t in state.items():
        if internal == "output.weight" and args.tie_embeddings:
            continue
        if internal in HEADS:
            out[internal] = t.contiguous()
            config.update(architectures=["LlamaForSequenceClassification"], num_labels=t.shape[0])
            continue
        if is_rotary(internal):
            heads = args.n_heads if internal.endswith("wq.weight") else args.n_kv_heads
            t = meta_to_hf_rows(t, heads)
        out[from_internal(internal, "hf")] = t.contiguous()
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(out, dst / SINGLE_FILE, metadata={"format": "pt"})
    return dst
