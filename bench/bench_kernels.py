"""Micro-benchmark of the GGUF kernels on SmolLM2-135M Q4_1's shapes: time per call and GB/s.

Compares the C++ kernels with a dense float32 matmul and with the torch dequantize fallback, for
one activation row (decode) and 512 rows (prefill), then times a whole decode step's matmuls
(30 layers x q,k,v,o,gate,up,down + output), streaming all weights as real decoding does.

    .venv/bin/python bench/bench_kernels.py [--threads 2]
    .venv/bin/python bench/bench_kernels.py --threads 1 --cpu-time   # on a busy shared machine
    .venv/bin/python bench/bench_kernels.py --isa avx2,avx512 --threads 1 --cpu-time

--isa builds the kernels for the named instruction sets (LLAMAHERD_KERNEL_ISA, e.g. the AVX2 code
on an AVX-512 machine); with several, it times the decode step's matrices at batch 1 and 8 (or the
--rows given) for each in its own process and prints them side by side:

    .venv/bin/python bench/bench_kernels.py --isa avx512,amx --rows 1,4,8,16,64,512

--cpu-time counts the process's CPU time instead of wall time: with one thread that is the time
the kernels really ran, unaffected by other processes taking the cores (with several threads it
would also count threads spinning at barriers, so it needs --threads 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from gguf import GGUFReader

from llamaherd import hub, kernels
from llamaherd.quant.gguf_linear import GGUFLinear

SHAPES = [  # (label, tensor)
    ("attn_q   576->576", "blk.0.attn_q.weight"),
    ("attn_k   576->192", "blk.0.attn_k.weight"),
    ("ffn_up   576->1536", "blk.0.ffn_up.weight"),
    ("ffn_down 1536->576", "blk.0.ffn_down.weight"),
    ("output   576->49152", "token_embd.weight"),
]
LAYER_TENSORS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
DECODE_MATRICES = [  # (label, tensors side by side): the matrices of a fused decode step
    ("attn_o   576->576", ["blk.0.attn_output.weight"]),
    ("qkv      576->960", ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]),
    ("gate|up  576->3072", ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]),
    ("ffn_down 1536->576", ["blk.0.ffn_down.weight"]),
    ("output   576->49152", ["token_embd.weight"]),
]
DECODE_ROWS = (1, 8)


clock = time.perf_counter


def seconds_per_call(fn: Callable[[], object], budget: float = 0.3) -> float:
    """Median time of fn over about `budget` seconds (at least 3 calls) after one warm-up."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return sorted(times)[len(times) // 2]


def shape_table(tensors: dict) -> None:
    print(f"{'shape':<20} {'rows':>5} | {'kernel us':>10} {'GB/s':>6} | {'dense f32 us':>12} "
          f"{'GB/s':>6} | {'fallback us':>11}")
    for label, name in SHAPES:
        t = tensors[name]
        layer = GGUFLinear.from_gguf(t)
        fallback = GGUFLinear.from_gguf(t, kernels=False)
        dense = layer.dequantize()
        for rows in (1, 512):
            x = torch.randn(rows, layer.in_features)
            budget = 0.3 if rows == 1 else 1.0
            k = seconds_per_call(lambda x=x, layer=layer: layer(x), budget)
            d = seconds_per_call(lambda x=x, dense=dense: x @ dense.T, budget)
            f = seconds_per_call(lambda x=x, fallback=fallback: fallback(x), budget)
            print(f"{label:<20} {rows:>5} | {k * 1e6:>10.1f} {layer.data.numel() / k / 1e9:>6.1f} | "
                  f"{d * 1e6:>12.1f} {dense.numel() * 4 / d / 1e9:>6.1f} | {f * 1e6:>11.1f}")


def decode_matrix_times(tensors: dict, row_counts: list[int]) -> dict[str, dict[int, float]]:
    """Microseconds per kernel matmul of each DECODE_MATRICES entry, for each activation row count."""
    times: dict[str, dict[int, float]] = {}
    for label, names in DECODE_MATRICES:
        layer = GGUFLinear.concat([GGUFLinear.from_gguf(tensors[n]) for n in names])
        times[label] = {}
        for rows in row_counts:
            x = torch.randn(rows, layer.in_features)
            times[label][rows] = 1e6 * seconds_per_call(lambda x=x, layer=layer: layer(x))
    return times


def compare_isas(isas: list[str], row_counts: list[int], passed: list[str]) -> None:
    """Time DECODE_MATRICES with the kernels built for each ISA, each in its own process."""
    results = {}
    for isa in isas:
        env = dict(os.environ, LLAMAHERD_KERNEL_ISA=isa)
        run = subprocess.run([sys.executable, __file__, *passed, "--matrices-json"], env=env,
                             capture_output=True, text=True, check=True)
        results[isa] = json.loads(run.stdout.splitlines()[-1])
    simds = ", ".join(f"{isa}: {r['simd']}" for isa, r in results.items())
    print(f"kernels per ISA ({simds}); microseconds per matmul, ratio to {isas[0]}")
    print(f"{'matrix':<20} {'rows':>4} | " + " | ".join(f"{isa:>16}" for isa in isas))
    for label, _ in DECODE_MATRICES:
        for rows in row_counts:
            base = results[isas[0]]["times"][label][str(rows)]
            cells = [f"{r['times'][label][str(rows)]:>9.1f} {r['times'][label][str(rows)] / base:>5.2f}x"
                     for r in results.values()]
            print(f"{label:<20} {rows:>4} | " + " | ".join(f"{c:>16}" for c in cells))


def decode_step_time(tensors: dict, fused: bool) -> tuple[float, int]:
    """Seconds for one decode step's matmuls (batch 1) and the weight bytes they read."""
    layers: list[GGUFLinear] = []
    for i in range(30):
        mods = {n: GGUFLinear.from_gguf(tensors[f"blk.{i}.{n}.weight"]) for n in LAYER_TENSORS}
        if fused:
            layers += [GGUFLinear.concat([mods["attn_q"], mods["attn_k"], mods["attn_v"]]),
                       mods["attn_output"], GGUFLinear.concat([mods["ffn_gate"], mods["ffn_up"]]),
                       mods["ffn_down"]]
        else:
            layers += list(mods.values())
    layers.append(GGUFLinear.from_gguf(tensors["token_embd.weight"]))
    inputs = [torch.randn(1, layer.in_features) for layer in layers]

    def step() -> None:
        for layer, x in zip(layers, inputs):
            layer(x)

    return seconds_per_call(step, 2.0), sum(layer.data.numel() for layer in layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="time CPU use, not wall time")
    parser.add_argument("--isa", help="comma-separated LLAMAHERD_KERNEL_ISA builds to time")
    parser.add_argument("--rows", default=",".join(map(str, DECODE_ROWS)),
                        help="comma-separated activation row counts for --isa (default 1,8)")
    parser.add_argument("--matrices-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    isas = args.isa.split(",") if args.isa else []
    row_counts = [int(r) for r in args.rows.split(",")]
    if len(isas) > 1:
        passed = ["--threads", str(args.threads), "--rows", args.rows] + ["--cpu-time"] * args.cpu_time
        return compare_isas(isas, row_counts, passed)
    if isas:
        os.environ["LLAMAHERD_KERNEL_ISA"] = isas[0]
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time needs --threads 1")
        global clock
        clock = time.process_time
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("the GGUF kernels are not built: run `.venv/bin/python -m "
                         "llamaherd.kernels`")
    tensors = {t.name: t for t in GGUFReader(hub.pull("smollm2-135m-instruct")).tensors}
    if args.matrices_json:
        print(json.dumps({"simd": kernels.load().simd(), "times": decode_matrix_times(tensors, row_counts)}))
        return
    print(f"kernels: {kernels.load().simd()}, threads: {torch.get_num_threads()}, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    shape_table(tensors)
    for fused in (False, True):
        seconds, nbytes = decode_step_time(tensors, fused)
        calls = "121 calls, fused qkv and gate|up" if fused else "211 calls"
        print(f"decode step, all matmuls ({calls}): {seconds * 1e3:.2f} ms, "
              f"{nbytes / seconds / 1e9:.1f} GB/s, bound {1 / seconds:.0f} tok/s")


if __name__ == "__main__":
    main()
