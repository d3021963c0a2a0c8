"""The GGUF kernels and layers against the gguf package's dequantization and float matmuls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import attention_case, draw_cases, make_tiny_model, reference_attention
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llamaherd.checkpoint.convert import write_gguf
from llamaherd.quant import kernels
from llamaherd.quant.dequant import dequantize
from llamaherd.quant.gguf_linear import GGUFEmbedding, GGUFLinear
from llamaherd.quant.kquants import KERNEL_TYPE, convert, convert_numpy

KERNEL_TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
SHAPES = [(576, 577), (1536, 193), (64, 5)]  # (in_features, out_features): odd and tail-group rows
ROWS = [1, 3, 8, 64, 512]


def random_weights(qtype: T, out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Packed GGUF rows: quantized Gaussians, or (k-quants, which gguf cannot quantize) random
    bytes whose f16 super-block scales are set to sane values."""
    rng = np.random.default_rng(seed)
    if qtype not in K_QUANTS:
        return gguf_quantize(rng.standard_normal((out_features, in_features), np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (out_features, in_features // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, data.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:  # d is the last field
        data[..., -2:] = scales[..., :2]
    else:  # d and dmin lead the block
        data[..., :4] = scales
    return data.reshape(out_features, -1)


def reference(data: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(data, qtype).astype(np.float32))


def activations_as_kernels_see_them(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 8-bit blocks of 32 exactly as the kernels quantize it (same float ops)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a tensor numerator: `127 / amax` would compute 127 * (1 / amax), rounded differently
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)


def bf16_path(rows: int, bf16_min_rows: int | None = None) -> bool:
    """Whether a build whose bf16_min_rows() is this (default: the native build's) multiplies
    `rows` activation rows with AMX-BF16 (bfloat16 products) rather than 8-bit integer dots."""
    if bf16_min_rows is None:
        bf16_min_rows = kernels.load().bf16_min_rows()
    return 0 < bf16_min_rows <= rows


def as_kernels_compute(x: torch.Tensor, w: torch.Tensor,
                       bf16_min_rows: int | None = None) -> torch.Tensor:
    """x @ w.T with the rounding of the kernels' path for x's row count (see bf16_path): the
    activations in 8-bit blocks, or activations and weights in bfloat16; summed in float64."""
    if bf16_path(x.shape[0], bf16_min_rows):
        return (x.bfloat16().double() @ w.bfloat16().double().T).float()
    return (activations_as_kernels_see_them(x).double() @ w.double().T).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                 dim=0).item()


def test_kernels_are_built_for_this_machine():
    assert kernels.available(), ("the GGUF C++ kernels failed to build or load: run "
                                 "`.venv/bin/python -m llamaherd.quant.kernels -v` to see why")
    assert kernels.load().simd() in {"avx512_vnni+amx+bf16", "avx512_vnni+amx", "avx512_vnni",
                                     "avx_vnni", "avx2", "scalar"}


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cache_rows_are_copied_as_slices_would_be(dtype):
    """copy_rows copies positions start..n-1 of one cache row into another in every cache, as
    torch's slice assignment does, and leaves every other element alone."""
    ext = kernels.load()
    caches = [torch.randn(4, 3, 32, 16).to(dtype) for _ in range(4)]
    expected = [c.clone() for c in caches]
    for c in expected:
        c[2, :, 5:19] = c[0, :, 5:19]
    ext.copy_rows(caches, 0, 2, 5, 19)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))
    with pytest.raises(RuntimeError, match="out of range"):
        ext.copy_rows(caches, 0, 4, 0, 8)  # no row 4
    with pytest.raises(RuntimeError, match="out of range"):
        ext.copy_rows(caches, 0, 1, 0, 33)  # past max_len
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))  # refused before any copy


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
            "from llamaherd.quant import kernels\n"
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


# Builds of other instruction sets than this CPU's best, each tested in its own process: the ones
# this CPU can run (on a Sapphire Rapids machine, all of them). Where the native build multiplies
# 16 or more rows with AMX, the "avx512" build is the same code without it.
CPU_FLAGS = set(kernels._cpu_features().split())
AMX_CPU = {"amx_tile", "amx_int8"} <= CPU_FLAGS
VARIANTS = [isa for isa in ("amx_bf16", "amx", "avx512", "avx2", "avx_vnni", "scalar")
            if kernels.ISA_CPU_FLAGS.get(isa, set()) <= CPU_FLAGS]
VARIANT_SIMD = {"amx_bf16": "avx512_vnni+amx+bf16", "amx": "avx512_vnni+amx",
                "avx512": "avx512_vnni"}  # simd() where not the ISA name
VARIANT_SHAPES = [(576, 577), (1536, 40), (64, 5)]  # (in, out): odd, tail-panel and 1-panel rows
# AMX-INT8 from 16 rows, in groups of 16 and a tail group; AMX-BF16 from 64
VARIANT_ROWS = [1, 3, 8, 16, 17, 63, 65, 512]

VARIANT_SCRIPT = """
import sys, torch
from llamaherd.checkpoint import load_checkpoint
from llamaherd.quant import kernels
from llamaherd.quant.gguf_linear import GGUFLinear
cases = torch.load(sys.argv[1])
outputs = [GGUFLinear(c["data"], c["qtype"], *c["shape"], kernels=True)(c["x"])
           for c in cases["matmuls"]]
d = cases["draw"]
drawn = kernels.load().draw(d["logits"], d["temperatures"], d["u"]) if d else None
attended = [kernels.load().attention(*c) for c in cases.get("attention", [])]
decode = None
if len(sys.argv) > 3:  # a packed model's decode steps, fused and layer by layer
    model = load_checkpoint(sys.argv[3]).model
    decoder, decode = model.fast_decode, {}
    for fast in (True, False):
        model.fast_decode = decoder if fast else None
        model.setup_cache(3, 32)
        rows = torch.tensor([2, 0])
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.arange(4).expand(2, 4), rows)
            decode[fast] = torch.stack([model(torch.tensor([[9 + t], [20 + t]]),
                                              torch.tensor([[4 + t], [4 + 2 * t]]), rows)[:, -1]
                                        for t in range(3)])
torch.save({"simd": kernels.load().simd(), "bf16_min_rows": kernels.load().bf16_min_rows(),
            "outputs": outputs, "decode": decode, "draw": drawn, "attention": attended},
           sys.argv[2])
"""


def test_kernel_isa_setting_is_checked(monkeypatch):
    if "avx2" in CPU_FLAGS:  # x86: the AVX2 code must be tested wherever it can run
        assert {"avx2", "scalar"} <= set(VARIANTS)
    monkeypatch.setenv("LLAMAHERD_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="LLAMAHERD_KERNEL_ISA='sse9' is not one of native"):
        kernels.isa()
    monkeypatch.setenv("LLAMAHERD_KERNEL_ISA", "avx2")
    monkeypatch.setattr(kernels, "_cpu_features", lambda: "flags : fpu sse2 avx fma")
    with pytest.raises(ValueError, match="avx2 needs CPU features this CPU lacks: abm, avx2, bmi1"):
        kernels.isa()
    monkeypatch.setenv("LLAMAHERD_KERNEL_ISA", "scalar")
    assert kernels.isa() == "scalar" and kernels.cflags() == kernels.CFLAGS


def test_native_build_uses_amx_exactly_where_the_cpu_has_it():
    """On an AMX-INT8 CPU the native build multiplies with AMX tiles (so the "avx512" variant's
    test below compares AMX with AVX512-VNNI); elsewhere simd() must not claim AMX."""
    if AMX_CPU:
        bf16 = {"amx_bf16", "avx512_bf16"} <= CPU_FLAGS  # AMX-BF16 too (Sapphire Rapids on)
        assert kernels.load().simd() == "avx512_vnni+amx" + "+bf16" * bf16, (
            "this CPU has AMX-INT8 but the native kernels do not use it: the compiler must define "
            "__AMX_TILE__/__AMX_INT8__ for -march=native and Linux (5.16 on) must grant the tile state")
    else:
        assert "amx" not in kernels.load().simd()


def run_variant(cases: list[dict], tmp_path: Path, model: Path | None = None,
                draw: dict | None = None, attention: list | None = None, **env: str) -> dict:
    """VARIANT_SCRIPT's {"simd", "outputs", "decode", "draw", "attention"} for the matmul `cases`
    (the decode steps of the packed GGUF `model`, the tokens drawn for a draw_cases() `draw`, the
    kernels' attention for attention_case() tuples), in a subprocess with `env` set."""
    torch.save({"matmuls": cases, "draw": draw, "attention": attention or []},
               tmp_path / "cases.pt")
    args = [str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")] + ([str(model)] if model else [])
    run = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT, *args], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=600, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    return torch.load(tmp_path / "out.pt")


def test_amx_refused_at_run_time_falls_back_to_vnni(tmp_path):
    """When Linux refuses the tile state (here: LLAMAHERD_NO_AMX=1), the same build takes the
    VNNI tiles for every matmul and gives the same results."""
    data = torch.from_numpy(random_weights(T.Q4_1, 40, 576))
    x = torch.randn(32, 576)
    result = run_variant([{"data": data, "qtype": int(T.Q4_1), "shape": (576, 40), "x": x}],
                         tmp_path, LLAMAHERD_NO_AMX="1")
    assert result["simd"] == kernels.load().simd().split("+amx")[0]
    assert result["bf16_min_rows"] == 0  # no AMX-BF16 either
    assert torch.equal(result["outputs"][0], GGUFLinear(data, T.Q4_1, 576, 40)(x))


@pytest.mark.parametrize("isa", VARIANTS)
def test_instruction_set_variant_matches_native_kernels(isa, tmp_path):
    """Build the kernels for `isa` in a subprocess; the token draw must pick the expected tokens,
    and every type, shape and batch size must give
    the native build's results (bit for bit for the vector and AMX-INT8 paths, which compute the
    same integer dots and then the same float ops; and where both builds take AMX-BF16) and the
    dequantized float32 reference's, rounded as the path rounds."""
    cases = []
    for qtype in KERNEL_TYPES:
        for in_f, out_f in VARIANT_SHAPES:
            data = torch.from_numpy(random_weights(qtype, out_f, in_f, seed=in_f + out_f))
            for rows in VARIANT_ROWS:
                x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
                cases.append({"data": data, "qtype": int(qtype), "shape": (in_f, out_f), "x": x})
    model = write_gguf(make_tiny_model(), tmp_path / "tiny.gguf", weight_type="Q4_1")
    draw = draw_cases()
    attention = [attention_case(d, dt) for d in (64, 128, 48) for dt in (torch.float16, torch.float32)]
    result = run_variant(cases, tmp_path, model, draw, attention, LLAMAHERD_KERNEL_ISA=isa)
    assert result["simd"] == VARIANT_SIMD.get(isa, isa)  # simd() names the path the build compiled
    assert torch.equal(result["draw"], draw["tokens"])  # the token draw (sampling.h)
    for case, got in zip(attention, result["attention"], strict=True):  # prefill attention
        assert (got - reference_attention(*case)).abs().max() < 1e-5, case[0].shape
    # the fused decode step (attention over the float16 cache, written per instruction set)
    # agrees with the same build's layers, and with this machine's native build
    fast, slow = result["decode"][True], result["decode"][False]
    assert (fast - slow).abs().max() < 1e-4 * slow.abs().max()
    native = run_variant([], tmp_path, model)["decode"][True]
    assert (fast - native).abs().max() < 1e-4 * native.abs().max()
    for case, y in zip(cases, result["outputs"], strict=True):
        data, (in_f, out_f), x = case["data"], case["shape"], case["x"]
        qtype = T(case["qtype"])
        native = GGUFLinear(data, qtype, in_f, out_f, kernels=True)(x)
        label = f"{qtype.name} {in_f}->{out_f}, {x.shape[0]} rows"
        assert y.shape == native.shape, label
        w = reference(data.numpy(), qtype)
        rows = x.shape[0]
        emulated = as_kernels_compute(x, w, result["bf16_min_rows"])
        assert (y - emulated).abs().max() < 3e-5 * emulated.abs().mean(), label
        if bf16_path(rows, result["bf16_min_rows"]) != bf16_path(rows):
            # one build rounds to bfloat16, the other to 8-bit activations (each checked above)
            assert cosine(y, native) > 0.9999, label
        elif isa != "scalar" and kernels.load().simd() != "scalar":
            assert torch.equal(y, native), label
        else:  # the scalar code sums each row's blocks in another order
            assert (y - native).abs().max() < 3e-5 * emulated.abs().mean(), label
