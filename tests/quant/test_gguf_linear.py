"""GGUFLinear and GGUFEmbedding (packed GGUF weights on the kernels, or dequantized in torch)
against the gguf package's dequantization and float matmuls."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from llamaherd import kernels
from llamaherd.quant.dequant import dequantize
from llamaherd.quant.gguf_linear import GGUFEmbedding, GGUFLinear
from llamaherd.quant.kquants import KERNEL_TYPE, convert, convert_numpy
from tests.support.quantized import (
    K_QUANTS,
    KERNEL_TYPES,
    ROWS,
    SHAPES,
    as_kernels_compute,
    cosine,
    random_weights,
    reference,
)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_weights_dequantize_exactly(qtype, shape):
    in_f, out_f = shape
    data = random_weights(qtype, out_f, in_f)
    layer = GGUFLinear(data, qtype, in_f, out_f)
    padded = (out_f + 15) // 16 * 16  # repacking keeps the size, up to 16-row panels
    assert layer.packed and layer.data.shape == (padded, data.shape[1])
    assert torch.equal(layer.dequantize(), reference(data, qtype))
    ops = kernels.load()
    assert np.array_equal(ops.unpack(layer.data, int(qtype), out_f).numpy(), data)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matmul_matches_reference(qtype, shape, rows):
    in_f, out_f = shape
    data = random_weights(qtype, out_f, in_f, seed=rows)
    w = reference(data, qtype)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
    y = GGUFLinear(data, qtype, in_f, out_f, kernels=True)(x)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    # Exact up to float32 rounding once rounded the kernels' way (8-bit activation blocks, or
    # bfloat16 activations and weights on the AMX-BF16 path) ...
    emulated = as_kernels_compute(x, w)
    assert (y - emulated).abs().max() < 3e-5 * emulated.abs().mean()
    # ... and close to the float matmul: either rounding costs about 1e-2 relative error.
    exact = x @ w.T
    assert cosine(y, exact) > 0.9999
    assert (y - exact).abs().max() < 0.1 * exact.abs().mean()


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
def test_rows_together_give_each_rows_own_result_bit_for_bit(qtype):
    """A batch's rows go through the multi-row tiles (on AVX2: both panel halves a pass, Q8 by
    the sign trick), a single row through the one-row path: the same integer dots and float ops,
    so decoding a sequence in a batch gives the very logits it gets alone."""
    in_f, out_f = 1536, 193
    layer = GGUFLinear(random_weights(qtype, out_f, in_f, seed=7), qtype, in_f, out_f, kernels=True)
    x = torch.randn(13, in_f, generator=torch.Generator().manual_seed(3)) * 4
    x[5] = 0  # an all-zero row: activation scale 0
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("qtype", KERNEL_TYPES + K_QUANTS + [T.F16], ids=lambda t: t.name)
def test_torch_dequantize_matches_gguf(qtype):
    data = random_weights(qtype, 7, 256) if qtype != T.F16 else (
        np.random.default_rng(0).standard_normal((7, 256)).astype(np.float16).view(np.uint8))
    assert torch.equal(dequantize(torch.from_numpy(data), qtype), reference(data, qtype))


@pytest.mark.parametrize("qtype", KERNEL_TYPES + K_QUANTS, ids=lambda t: t.name)
def test_fallback_layer_is_a_float_matmul(qtype):
    data = random_weights(qtype, 33, 512)
    layer = GGUFLinear(data, qtype, 512, 33, kernels=False)
    assert not layer.packed
    x = torch.randn(2, 3, 512)
    torch.testing.assert_close(layer(x), x @ reference(data, qtype).T, rtol=1e-5, atol=1e-5)
    if qtype in K_QUANTS:  # by default they are rewritten for the kernels instead
        assert GGUFLinear(data, qtype, 512, 33).packed


def test_layer_keeps_leading_dims_and_input_dtype():
    data = random_weights(T.Q4_1, 96, 128)
    layer = GGUFLinear(data, T.Q4_1, 128, 96)
    x = torch.randn(2, 5, 128)
    assert torch.equal(layer(x), layer(x.reshape(10, 128)).reshape(2, 5, 96))
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_concat_computes_outputs_side_by_side():
    parts = [GGUFLinear(random_weights(T.Q4_1, n, 576, seed=n), T.Q4_1, 576, n)
             for n in (576, 192, 192)]
    fused = GGUFLinear.concat(parts)
    assert (fused.in_features, fused.out_features) == (576, 960)
    x = torch.randn(4, 576)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    other = GGUFLinear(random_weights(T.Q8_0, 8, 576), T.Q8_0, 576, 8)
    with pytest.raises(ValueError, match="one qtype"):
        GGUFLinear.concat([parts[0], other])


@pytest.mark.parametrize("sizes", [(64, 32, 32), (40, 24, 9)], ids=["panel-aligned", "ragged"])
def test_split_layers_compute_their_blocks_and_join_back(sizes):
    """split() gives layers computing consecutive blocks of outputs; panel-aligned blocks are
    views of the packed bytes, and concat() joins such views back without a copy."""
    out_f = sum(sizes)
    whole = GGUFLinear(random_weights(T.Q4_1, out_f, 256, seed=3), T.Q4_1, 256, out_f)
    parts = whole.split(list(sizes))
    x = torch.randn(3, 256)
    assert [p.out_features for p in parts] == list(sizes)
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), whole(x))
    joined = GGUFLinear.concat(parts)
    assert torch.equal(joined(x), whole(x))
    views = all(n % 16 == 0 for n in sizes[:-1])
    shares = all(p.data.untyped_storage().data_ptr() == whole.data.untyped_storage().data_ptr()
                 for p in [*parts, joined])
    assert shares == views  # views and their join share the layer's bytes; re-packed parts not
    with pytest.raises(ValueError, match="add up"):
        whole.split([8, 8])


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_stacked_row_blocks_pack_as_one_matrix(qtype):
    # how the loader packs q|k|v straight from the file: row blocks, including ones that are not
    # whole panels of 16 rows, give the layer of the rows concatenated
    blocks = [random_weights(qtype, n, 64, seed=n) for n in (24, 8, 5)]
    stacked = GGUFLinear(blocks, qtype, 64, 37)
    whole = GGUFLinear(np.concatenate(blocks), qtype, 64, 37)
    assert torch.equal(stacked.data, whole.data)
    assert torch.equal(stacked.dequantize(), reference(np.concatenate(blocks), qtype))
    with pytest.raises(ValueError, match="needs uint8 data"):
        GGUFLinear(blocks, qtype, 64, 36)


@pytest.mark.parametrize("qtype, as_type, bound", [(T.Q4_K, T.Q4_1, 2 ** -11),
                                                   (T.Q5_K, T.Q8_0, 1 / 254),
                                                   (T.Q6_K, T.Q8_0, 1 / 254)])
def test_k_quants_are_packed_as_kernel_types(qtype, as_type, bound):
    data = random_weights(qtype, 40, 512, seed=3)
    want = reference(data, qtype)
    layer = GGUFLinear(data, qtype, 512, 40)
    assert layer.packed and (layer.source_qtype, layer.qtype) == (qtype, as_type)
    got = layer.dequantize()
    # Q4_K -> Q4_1 rounds each sub-block's scale and min to float16 (relative 2^-11, so at most
    # that share of a weight's magnitude plus the min's); Q8_0 rounds each weight to 1/254 of
    # its block's largest
    blocks = want.reshape(40, -1, 32).abs().amax(-1, keepdim=True)
    err = (got - want).abs().reshape(40, -1, 32)
    assert (err <= bound * 2 * blocks + 1e-6).all(), (err / blocks).max()
    x = torch.randn(3, 512)
    assert cosine(layer(x), x @ want.T) > 0.999
    assert f"{qtype.name} as {as_type.name}" in repr(layer)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_rewrite_in_cpp_gives_the_numpy_bytes(qtype):
    # the kernels' rewrite against the one through the gguf package's dequantization: random
    # blocks, so every bit pattern of quants, scales and mins occurs
    data = random_weights(qtype, 37, 768, seed=5)
    target = KERNEL_TYPE[qtype]
    fast, kind = convert(data, qtype)
    assert kind == target and np.array_equal(fast, convert_numpy(data, qtype, target))


def test_embedding_looks_up_rows_and_ties_to_the_output_projection():
    data = random_weights(T.Q8_0, 100, 64)
    emb = GGUFEmbedding(data, T.Q8_0, 64, 100)
    ids = torch.tensor([[3, 99, 0], [3, 7, 50]])
    out = emb(ids)
    assert out.shape == (2, 3, 64)
    assert torch.equal(out, reference(data, T.Q8_0)[ids])
    assert emb.as_linear().data.data_ptr() == emb.table.data.data_ptr()  # one copy of the bytes
    with pytest.raises(IndexError):
        emb(torch.tensor([100]))


def test_gradient_flows_to_the_input_through_the_kernel():
    data = random_weights(T.Q4_1, 40, 256)
    layer = GGUFLinear(data, T.Q4_1, 256, 40)
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).square().sum().backward()
    xd = x.detach().clone().requires_grad_()
    (xd @ reference(data, T.Q4_1).T).square().sum().backward()
    assert cosine(x.grad, xd.grad) > 0.9999


def test_bad_inputs_are_refused_with_clear_errors():
    data = random_weights(T.Q4_1, 8, 64)
    with pytest.raises(ValueError, match="needs uint8 data of shape"):
        GGUFLinear(data, T.Q4_1, 64, 9)
    with pytest.raises(ValueError, match="multiple of 32"):
        GGUFLinear(data, T.Q4_1, 65, 8)
    f16 = np.zeros((2, 256), np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="no GGUF kernel for F16"):
        GGUFLinear(f16, T.F16, 256, 2, kernels=True)


def test_default_model_tensors(default_model_path):
    tensors = {t.name: t for t in GGUFReader(default_model_path).tensors}
    q = GGUFLinear.from_gguf(tensors["blk.0.attn_q.weight"])
    down = GGUFLinear.from_gguf(tensors["blk.0.ffn_down.weight"])
    assert (q.qtype, q.in_features, q.out_features, q.packed) == (T.Q4_1, 576, 576, True)
    for layer, name in ((q, "blk.0.attn_q.weight"), (down, "blk.0.ffn_down.weight")):
        w = reference(np.asarray(tensors[name].data), layer.qtype)
        assert torch.equal(layer.dequantize(), w)
        x = torch.randn(5, layer.in_features)
        assert cosine(layer(x), x @ w.T) > 0.9999

    t = tensors["token_embd.weight"]
    emb = GGUFEmbedding(t.data, t.tensor_type, 576, 49152)
    ids = torch.tensor([0, 1, 12345, 49151])
    table = np.asarray(t.data)[ids.numpy()]
    assert torch.equal(emb(ids), reference(table, T.Q8_0))
    x = torch.randn(1, 576)
    logits = emb.as_linear()(x)
    assert logits.shape == (1, 49152)
    assert cosine(logits[:, ids], x @ reference(table, T.Q8_0).T) > 0.9999


def test_without_kernels_layers_fall_back_with_a_warning():
    code = ("import torch, warnings\n"
            "from llamaherd import kernels\n"
            "from llamaherd.quant.gguf_linear import GGUFLinear\n"
            "from gguf.quants import quantize, dequantize\n"
            "w = torch.randn(16, 64).numpy()\n"
            "data = quantize(w, 3)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    assert not kernels.available()\n"
            "layer = GGUFLinear(data, 3, 64, 16)\n"
            "x = torch.randn(2, 64)\n"
            "ref = x @ torch.from_numpy(dequantize(data, 3)).T\n"
            "assert not layer.packed and torch.allclose(layer(x), ref, atol=1e-5)\n"
            "print(caught[0].message)\n")
    env = dict(os.environ, LLAMAHERD_NO_KERNELS="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "GGUF C++ kernels unavailable (LLAMAHERD_NO_KERNELS=1)" in run.stdout
