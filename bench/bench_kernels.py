"""Micro-benchmark of the GGUF kernels on SmolLM2-135M Q4_1's shapes: time per call and GB/s.

Compares the C++ kernels with a dense float32 matmul and with the torch dequantize fallback, for
one activation row (decode) and 512 rows (prefill), then times a whole decode step's matmuls
(30 layers x q,k,v,o,gate,up,down + output), streaming all weights as real decoding does.

    .venv/bin/python bench/bench_kernels.py [--threads 2]
    .venv/bin/python bench/bench_kernels.py --threads 1 --cpu-time   # on a busy shared machine

--cpu-time counts the process's CPU time instead of wall time: with one thread that is the time
the kernels really ran, unaffected by other processes taking the cores (with several threads it
would also count threads spinning at barriers, so it needs --threads 1).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from gguf import GGUFReader

from llamaherd import hub
from llamaherd.quant import kernels
from llamaherd.quant.gguf_linear import GGUFLinear

SHAPES = [  # (label, tensor)
    ("attn_q   576->576", "blk.0.attn_q.weight"),
    ("attn_k   576->192", "blk.0.attn_k.weight"),
    ("ffn_up   576->1536", "blk.0.ffn_up.weight"),
    ("ffn_down 1536->576", "blk.0.ffn_down.weight"),
    ("output   576->49152", "token_embd.weight"),
]
LAYER_TENSORS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


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
    args = parser.parse_args()
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time needs --threads 1")
        global clock
        clock = time.process_time
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("the GGUF kernels are not built: run `.venv/bin/python -m "
                         "llamaherd.quant.kernels`")
    print(f"kernels: {kernels.load().simd()}, threads: {torch.get_num_threads()}, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    tensors = {t.name: t for t in GGUFReader(hub.pull("smollm2-135m-instruct")).tensors}
    shape_table(tensors)
    for fused in (False, True):
        seconds, nbytes = decode_step_time(tensors, fused)
        calls = "121 calls, fused qkv and gate|up" if fused else "211 calls"
        print(f"decode step, all matmuls ({calls}): {seconds * 1e3:.2f} ms, "
              f"{nbytes / seconds / 1e9:.1f} GB/s, bound {1 / seconds:.0f} tok/s")


if __name__ == "__main__":
    main()
