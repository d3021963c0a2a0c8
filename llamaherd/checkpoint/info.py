"""`llamaherd info`: what a checkpoint holds, from its header or config, without loading weights."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from llamaherd.checkpoint import check_shapes, detect_format
from llamaherd.checkpoint.errors import CheckpointError
from llamaherd.config import ModelArgs


@dataclass
class Summary:
    path: Path
    format: str  # e.g. "GGUF v3", "Hugging Face safetensors"
    architecture: str
    args: ModelArgs
    stored_parameters: int  # elements of every stored weight tensor
    tensor_types: Counter[str]
    chat_template: str | None
    shapes: dict[str, tuple[int, ...]]  # internal name -> shape, checked against args
    name: str | None = None


def _gguf(path: Path) -> Summary:
    from llamaherd.checkpoint.gguf import dequantize, read_gguf
    from llamaherd.checkpoint.gguf_load import rope_scaling_from_divisors
    from llamaherd.checkpoint.keymaps import IGNORED, to_internal

    if path.is_dir():
        path = min(path.glob("*.gguf"))
    f = read_gguf(path)
    embd = f.tensors.get("token_embd.weight")
    try:
        vocab = embd.shape[0] if embd is not None else None
        args = ModelArgs.from_gguf(f.metadata, vocab_size=vocab)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad model metadata: {e}") from None
    args = args.replace(tie_embeddings=bool(f.tensors) and "output.weight" not in f.tensors)
    if "rope_freqs.weight" in f.tensors:  # a vector of head_dim / 2 numbers: cheap to read
        divisors = torch.from_numpy(dequantize(f.tensors["rope_freqs.weight"]).copy())
        args = args.replace(rope_scaling=rope_scaling_from_divisors(divisors, args))
    shapes = {}
    for name, t in f.tensors.items():
        if name not in IGNORED["gguf"]:
            shapes[to_internal(name, "gguf") or name] = t.shape
    kind = f"GGUF v{f.version}" + ("" if f.tensors else ", vocabulary only")
    return Summary(path, kind, str(f.metadata["general.architecture"]), args,
                   sum(prod(s) for s in shapes.values()),
                   Counter(t.qtype.name for t in f.tensors.values()),
                   f.metadata.get("tokenizer.chat_template"), shapes,
                   f.metadata.get("general.name"))


def _hf(path: Path) -> Summary:
    from llamaherd.checkpoint.hf import open_safetensors, read_config, tensor_files
    from llamaherd.checkpoint.keymaps import to_internal

    cfg, args = read_config(path)
    files = tensor_files(path)
    shapes, types = {}, Counter[str]()
    for file in sorted(set(files.values())):
        with open_safetensors(file) as f:
            for name in (n for n, fl in files.items() if fl == file):
                sl = f.get_slice(name)  # header only: shape and dtype
                shapes[to_internal(name, "hf") or name] = tuple(sl.get_shape())
                types[sl.get_dtype()] += 1
    stored = sum(prod(s) for s in shapes.values())
    if "lm_head.weight" not in files:
        args = args.replace(tie_embeddings=True)
    if args.tie_embeddings:  # an lm_head stored as a copy of the embedding
        shapes.pop("output.weight", None)
    template = None
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "tokenizer_config.json").exists():
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    arch = (cfg.get("architectures") or [cfg.get("model_type", "llama")])[0]
    return Summary(path, "Hugging Face safetensors", arch, args, stored, types,
                   template if isinstance(template, str) else None, shapes,
                   cfg.get("_name_or_path"))


def _meta(path: Path) -> Summary:
    from llamaherd.checkpoint.keymaps import IGNORED
    from llamaherd.checkpoint.meta import (
        args_from_params,
        concat_dim,
        read_params,
        read_shard,
        shard_files,
        type_name,
    )

    params = read_params(path)
    shards = [read_shard(f) for f in shard_files(path)]  # memory-mapped: no data is read
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in shards[0].items():
        if name in IGNORED["meta"]:
            continue
        shape = list(t.shape)
        d = concat_dim(name, tuple(t.shape), int(params["dim"]))
        if d is not None:
            shape[d] = sum(s[name].shape[d] for s in shards if name in s)
        shapes[name] = tuple(shape)
    vocab = shapes.get("tok_embeddings.weight", [0])[0]
    args = args_from_params(path, params, vocab)
    stored = sum(prod(s) for s in shapes.values())
    if "output.weight" not in shapes:
        args = args.replace(tie_embeddings=True)
    if args.tie_embeddings:
        shapes.pop("output.weight", None)
    types = Counter(type_name(t.dtype) for t in shards[0].values())
    return Summary(path, f"Meta consolidated .pth ({len(shards)} shard"
                         f"{'s' if len(shards) > 1 else ''})", "llama", args, stored, types, None,
                   shapes)


_SUMMARIES = {"gguf": _gguf, "hf": _hf, "meta": _meta}


def summarize(model: str | Path) -> Summary:
    """A registered model name or a checkpoint path, summarized from its header or config."""
    from llamaherd.hub import resolve_path

    path = resolve_path(model)
    summary = _SUMMARIES[detect_format(path)](path)
    if summary.shapes:  # a vocabulary-only GGUF has no tensors to check
        check_shapes(summary.args, summary.shapes, summary.path)
    return summary


def describe(model: str | Path) -> str:
    """The text `llamaherd info` prints."""
    s = summarize(model)
    a = s.args
    types = ", ".join(f"{name}: {n}" for name, n in s.tensor_types.most_common())
    if a.rope_scaling is None:
        rope = f"theta {a.rope_theta:g}, no scaling"
    else:
        r = a.rope_scaling
        rope = (f"theta {a.rope_theta:g}, llama3 scaling factor {r.factor:g} "
                f"(low {r.low_freq_factor:g}, high {r.high_freq_factor:g}, "
                f"original context {r.original_context})")
    template = "none" if not s.chat_template else f"yes ({len(s.chat_template)} characters)"
    rows = [
        ("file", str(s.path)),
        ("format", s.format + (f" ({s.name})" if s.name else "")),
        ("architecture", s.architecture),
        ("parameters", f"{a.num_parameters():,} from the config, {s.stored_parameters:,} stored"),
        ("tensor types", types or "none"),
        ("context length", str(a.max_seq_len)),
        ("dims", (f"dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, {a.n_kv_heads} kv "
                  f"heads, head dim {a.head_dim}, ffn {a.hidden_dim}, vocab {a.vocab_size}")),
        ("embeddings", "tied" if a.tie_embeddings else "separate output projection"),
        ("rope", rope),
        ("norm eps", f"{a.norm_eps:.3g}"),
        ("chat template", template),
    ]
    return "\n".join(f"{key + ':':16s}{value}" for key, value in rows)
