"""GGUF file -> Transformer: weights dequantized to float (the exact path), or quantized ones kept
packed in GGUFLinear layers."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from llamaherd import kernels
from llamaherd.checkpoint import Checkpoint, ReadTokenizer, build_model
from llamaherd.checkpoint.errors import CheckpointError
from llamaherd.checkpoint.gguf import GGUFTensor, dequantize, read_gguf
from llamaherd.checkpoint.keymaps import IGNORED, to_internal
from llamaherd.config import ModelArgs, RopeScaling
from llamaherd.model import rope_frequencies
from llamaherd.quant.gguf_linear import KERNEL_TYPES, GGUFEmbedding, GGUFLinear
from llamaherd.quant.kquants import KERNEL_TYPE, convert


def _to_torch(t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.require(dequantize(t), np.float32, ["C", "W"])).to(dtype)


def load_gguf(path: Path, *, dtype: torch.dtype | None = None, packed: bool = False,
              read_tokenizer: ReadTokenizer | None = None) -> Checkpoint:
    """dtype: of the float weights (default float32). packed: quantized tensors stay in their
    blocks, in GGUFLinear layers (GGUFEmbedding for the embedding); otherwise every tensor is
    dequantized. read_tokenizer(path, metadata): builds the file's tokenizer (Checkpoint.tokenizer)
    from the metadata already read, before the weights; the vocabulary lists are then dropped
    from the metadata, freeing megabytes of Python strings before the weights are read, so the
    long-lived objects made later are not scattered among them."""
    f = read_gguf(path)
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(path, "missing tensor token_embd.weight (a vocabulary-only GGUF "
                                    "holds no model)")
    try:
        args = ModelArgs.from_gguf(f.metadata, vocab_size=embd.shape[0])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad model metadata: {e}") from None
    args = args.replace(tie_embeddings="output.weight" not in f.tensors)
    tokenizer = None
    if read_tokenizer is not None:
        tokenizer = read_tokenizer(path, f.metadata)
        for key in [k for k, v in f.metadata.items()
                    if k.startswith("tokenizer.ggml.") and isinstance(v, list)]:
            del f.metadata[key]  # the vocabulary lives in the tokenizer now
    divisors = None
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1 converters store the scaling as divisors
        divisors = torch.from_numpy(dequantize(f.tensors["rope_freqs.weight"]).copy())
        scaling = rope_scaling_from_divisors(divisors, args)
        if scaling is not None:
            args, divisors = args.replace(rope_scaling=scaling), None

    raw: dict[str, GGUFTensor] = {}  # quantized tensors to pack, by internal name
    state: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    packed_shapes: dict[str, tuple[int, ...]] = {}
    for name, t in f.tensors.items():
        if name in IGNORED["gguf"]:
            continue
        internal = to_internal(name, "gguf")
        if internal is None:
            raise CheckpointError(path, f"unexpected tensor {name}")
        if packed and not t.is_float:
            packed_shapes[internal] = t.shape
            raw[internal] = t
            continue
        state[internal] = _to_torch(t, dtype or torch.float32)
    for parts in _groups(raw, args):  # q|k|v and gate|up: packed side by side
        tensors = [raw.pop(part) for part in parts]
        layers = _packed_group(tensors).split([t.shape[0] for t in tensors])
        for part, t, layer in zip(parts, tensors, layers):
            modules[part.removesuffix(".weight")] = layer
            f.release(t)
    for internal, t in raw.items():
        made = _packed_modules(internal, t, args)
        modules.update(made)
        if all(module.packed for module in made.values()):  # repacked: a copy of its own
            f.release(t)
    model = build_model(args, state, path, modules, packed_shapes)
    if divisors is not None:  # factors that no Llama 3.1 scaling explains: use them as they are
        model.rope_freqs = rope_frequencies(args.head_dim, args.rope_theta, None) / divisors
    types = Counter(t.qtype.name for t in f.tensors.values())
    return Checkpoint(model, args, "gguf", path, f.metadata, dict(types), tokenizer)


def rope_scaling_from_divisors(divisors: torch.Tensor, args: ModelArgs) -> RopeScaling | None:
    """The Llama 3.1 scaling whose per-frequency divisors these are (the largest divisor is the
    factor; the other constants are Meta's), or None if they follow some other rule."""
    scaling = RopeScaling(factor=float(divisors.max()))
    base = rope_frequencies(args.head_dim, args.rope_theta, None)
    expected = base / rope_frequencies(args.head_dim, args.rope_theta, scaling)
    if divisors.shape == expected.shape and torch.allclose(divisors, expected, rtol=1e-5):
        return scaling
    return None


# Projections of one input, packed side by side in one buffer: the inference runtime joins them
# into one matrix (runtime.prepare), which then costs no copy.
GROUPS = (("attention.wq", "attention.wk", "attention.wv"), ("feed_forward.w1", "feed_forward.w3"))


def _groups(raw: dict[str, GGUFTensor], args: ModelArgs) -> list[list[str]]:
    """The tensor names of each group of projections (GROUPS) that the kernels can pack as one:
    all parts present and of types the kernels take. None without the kernels."""
    groups = []
    for i in range(args.n_layers):
        for parts in GROUPS:
            names = [f"layers.{i}.{part}.weight" for part in parts]
            if all(n in raw and raw[n].qtype in KERNEL_TYPES | set(KERNEL_TYPE) for n in names):
                groups.append(names)
    return groups if groups and kernels.available() else []


def _packed_group(tensors: list[GGUFTensor]) -> GGUFLinear:
    """One packed layer of the parts' rows stacked, packed straight from the file. Parts that
    would pack as different types (a Q4_K_M file's Q4_K q and k with a Q6_K v) are all
    requantized to Q8_0."""
    in_features, out_features = tensors[0].shape[1], sum(t.shape[0] for t in tensors)
    if len({t.qtype for t in tensors}) == 1:  # the layer packs (and converts) its own type
        return GGUFLinear([t.data for t in tensors], tensors[0].qtype, in_features, out_features)
    kinds = {KERNEL_TYPE.get(t.qtype, t.qtype) for t in tensors}
    target = kinds.pop() if len(kinds) == 1 else GGMLQuantizationType.Q8_0
    parts = [convert(t.data, t.qtype, target)[0] for t in tensors]
    return GGUFLinear(parts, target, in_features, out_features)


def _packed_modules(internal: str, t: GGUFTensor, args: ModelArgs) -> dict[str, nn.Module]:
    """Quantized weights stay packed: a linear layer (and, for the embedding, a lookup table and
    the tied output projection) reading the GGUF bytes in place."""
    module_name = internal.removesuffix(".weight")
    with warnings.catch_warnings():  # the read-only memory map is only ever read
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(t.data)
    out_f, in_f = t.shape
    if module_name == "tok_embeddings":
        embedding = GGUFEmbedding(data, t.qtype, in_f, out_f)
        out = {"tok_embeddings": embedding}
        if args.tie_embeddings:  # the same packed bytes, not a second copy
            out["output"] = embedding.as_linear()
        return out
    return {module_name: GGUFLinear(data, t.qtype, in_f, out_f)}
