"""A float state dict as a model on the packed kernels, without a file: every matrix quantized
to Q8_0 in memory and packed, the norms kept in float32. This is how a trainer hands its
current weights to the inference engine (online post-training refreshes it after each update)."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from torch import nn

from llamaherd.checkpoint import build_model
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer
from llamaherd.quant.gguf_linear import GGUFEmbedding, GGUFLinear
from llamaherd.quant.quantize import Q8_0_BLOCK, quantize_q8_0

Q8_0 = GGMLQuantizationType.Q8_0


def packed_model(args: ModelArgs, state: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer over `state` (internal names, float) with each matrix as Q8_0 blocks (the
    embedding a packed lookup table, tied to the output projection as the file loader ties it).
    Matrices whose rows do not fill Q8_0 blocks stay float32."""
    modules: dict[str, nn.Module] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    floats: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        module = name.removesuffix(".weight")
        if module == "output" and args.tie_embeddings:
            continue  # the embedding's table serves as the output projection
        if t.dim() != 2 or t.shape[1] % Q8_0_BLOCK:
            floats[name] = t.detach().float().contiguous()
            continue
        rows = quantize_q8_0(t)
        out_f, in_f = t.shape
        shapes[name] = tuple(t.shape)
        if module == "tok_embeddings":
            embedding = GGUFEmbedding(rows, Q8_0, in_f, out_f)
            modules["tok_embeddings"] = embedding
            if args.tie_embeddings:
                modules["output"] = embedding.as_linear()
        else:
            modules[module] = GGUFLinear(rows, Q8_0, in_f, out_f)
    return build_model(args, floats, Path("<in memory>"), modules=modules, packed_shapes=shapes)
