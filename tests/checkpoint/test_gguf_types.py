"""Every GGUF tensor type the loader reads, on the exact float32 path and on the packed path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from llamaherd import runtime
from llamaherd.checkpoint import load_checkpoint
from llamaherd.checkpoint.gguf import read_gguf
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.checkpoint.keymaps import from_internal
from llamaherd.runtime import Runner
from tests.support.cases import rewrite_gguf
from tests.support.models import TINY, make_tiny_model
from tests.support.quantized import random_weights

WIDE = TINY.replace(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=512, head_dim=64)  # 256-blocks


def _packed(path: Path) -> Runner:
    """The file loaded with its quantized weights packed, as load() runs it."""
    return runtime.prepare(load_checkpoint(path, packed=True).model)


def _logits(path: Path, packed: bool) -> torch.Tensor:
    model = _packed(path).model if packed else load_checkpoint(path, dtype=torch.float32).model
    with torch.inference_mode():
        return model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                 dim=0).item()


@pytest.mark.parametrize("weight_type", ["F16", "BF16", "Q8_0", "Q4_1", "Q4_0"])
def test_written_types_load_on_both_paths(tmp_path: Path, weight_type: str) -> None:
    model = make_tiny_model(TINY)
    path = write_gguf(model, tmp_path / "m.gguf", weight_type=weight_type)
    f = read_gguf(path)
    assert f.tensors["blk.0.attn_q.weight"].qtype.name == weight_type
    exact = load_checkpoint(path, dtype=torch.float32).model
    # the float32 path holds exactly the file's values
    want = gguf_dequantize(np.asarray(f.tensors["blk.1.ffn_down.weight"].data), T[weight_type])
    assert torch.equal(exact.layers[1].feed_forward.w2.weight,
                       torch.from_numpy(want.reshape(TINY.dim, TINY.hidden_dim).astype(np.float32)))
    with torch.inference_mode():
        ref = model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]))
    f32 = _logits(path, packed=False)
    assert _cosine(f32, ref) > (0.9999 if weight_type in ("F16", "BF16", "Q8_0") else 0.99)
    assert _cosine(_logits(path, packed=True), f32) > 0.999  # packed (8-bit activations) vs exact


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_k_quant_files_load_on_both_paths(tmp_path: Path, qtype: T) -> None:
    # a file whose matrices are random k-quant blocks
    written = {}

    def k_quant(name: str, t) -> tuple[np.ndarray, T] | None:
        if len(t.shape) != 2 or name == "token_embd.weight":
            return None
        data = random_weights(qtype, t.shape[0], t.shape[1], seed=len(written))
        written[name] = gguf_dequantize(data, qtype).reshape(t.shape)
        return data, qtype

    rewrite_gguf(write_gguf(make_tiny_model(WIDE), tmp_path / "f32.gguf"), tmp_path / "k.gguf",
                 k_quant)
    exact = load_checkpoint(tmp_path / "k.gguf", dtype=torch.float32).model
    params = dict(exact.named_parameters())
    for internal in ("layers.0.attention.wk.weight", "layers.1.feed_forward.w3.weight"):
        want = torch.from_numpy(written[from_internal(internal, "gguf")].astype(np.float32))
        assert torch.equal(params[internal], want)
    # the packed path rewrites k-quants into kernel types (Q4_K as Q4_1, Q5_K/Q6_K as Q8_0)
    runner = _packed(tmp_path / "k.gguf")
    wqkv = runner.model.layers[0].attention.wqkv
    assert wqkv.packed and wqkv.source_qtype == qtype and runner.decoder is not None
    assert _cosine(_logits(tmp_path / "k.gguf", packed=True),
                   _logits(tmp_path / "k.gguf", packed=False)) > 0.999


def test_a_fused_group_of_mixed_types_is_packed_as_q8_0(tmp_path: Path) -> None:
    # as in Q4_K_M files: q and k in one type, v in another; the three still make one layer
    path = write_gguf(make_tiny_model(WIDE), tmp_path / "m.gguf", weight_type="Q4_1")
    rewrite_gguf(path, tmp_path / "mixed.gguf", lambda name, t: (
        random_weights(T.Q6_K, *t.shape), T.Q6_K) if name.endswith("attn_v.weight") else None)
    runner = _packed(tmp_path / "mixed.gguf")
    wqkv = runner.model.layers[1].attention.wqkv
    assert wqkv.qtype == T.Q8_0 and runner.decoder is not None
    assert runner.model.layers[1].feed_forward.w13.qtype == T.Q4_1  # an unmixed group keeps its type
    assert _cosine(_logits(tmp_path / "mixed.gguf", packed=True),
                   _logits(tmp_path / "mixed.gguf", packed=False)) > 0.999
