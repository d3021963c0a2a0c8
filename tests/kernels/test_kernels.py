"""The C++ kernels: the build for this machine, every other instruction set this CPU can run
(checked against the native build and float references), AMX refused at run time, and the
cache row copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

from llamaherd import kernels
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.quant.gguf_linear import GGUFLinear
from tests.support.cases import attention_case, draw_cases, reference_attention
from tests.support.models import make_tiny_model
from tests.support.quantized import (
    KERNEL_TYPES,
    as_kernels_compute,
    bf16_path,
    cosine,
    random_weights,
    reference,
)


def test_kernels_are_built_for_this_machine():
    assert kernels.available(), ("the GGUF C++ kernels failed to build or load: run "
                                 "`.venv/bin/python -m llamaherd.kernels -v` to see why")
    assert kernels.load().simd() in {"avx512_vnni+amx+bf16", "avx512_vnni+amx", "avx512_vnni",
                                     "avx_vnni", "avx2", "scalar"}


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
from llamaherd import kernels, runtime
from llamaherd.checkpoint import load_checkpoint
from llamaherd.quant.gguf_linear import GGUFLinear
cases = torch.load(sys.argv[1])
outputs = [GGUFLinear(c["data"], c["qtype"], *c["shape"], kernels=True)(c["x"])
           for c in cases["matmuls"]]
d = cases["draw"]
drawn = kernels.load().draw(d["logits"], d["temperatures"], d["u"]) if d else None
attended = [kernels.load().attention(*c) for c in cases.get("attention", [])]
decode = None
if len(sys.argv) > 3:  # a packed model's decode steps, fused and layer by layer
    runner = runtime.prepare(load_checkpoint(sys.argv[3], packed=True).model)
    decoder, decode = runner.decoder, {}
    for fast in (True, False):
        runner.decoder = decoder if fast else None
        runner.setup_cache(3, 32)
        rows = torch.tensor([2, 0])
        with torch.inference_mode():
            runner.forward(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]),
                           torch.arange(4).expand(2, 4), rows)
            decode[fast] = torch.stack([
                runner.forward(torch.tensor([[9 + t], [20 + t]]),
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
