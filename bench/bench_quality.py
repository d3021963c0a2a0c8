"""Quality and speed of each weight format: perplexity on the fixed text and batch-1 decode tok/s.

Modes: float32 (the exact dequantized GGUF), native (the GGUF's own packed quantized weights,
Q4_1 for the default model), and the weight-only modes int8, int4 and fp8 applied to the float32
weights. Every mode runs with fused projections. Prints a table with the change against float32
and writes bench/results/quality.json.

    .venv/bin/python bench/bench_quality.py [--model smollm2-135m-instruct] [--threads 2]

Perplexity: llamaherd.eval.perplexity on llamaherd/eval/data/eval_text.txt (windows of 512
tokens every 256). Decode: 64 greedy tokens, batch 1, through the KV cache after a 32-token
prompt, median of --runs timed runs. On a machine shared with other jobs use --threads 1: two
OpenMP threads that lose their cores make per-token times swing by an order of magnitude.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from llamaherd import api
from llamaherd.eval import eval_text, perplexity
from llamaherd.quant.weight_only import MODES
from llamaherd.runtime import Runner
from llamaherd.runtime.modules import fuse_projections

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN, DECODE_LEN = 32, 64
TARGETS = {"int8": 0.01, "int4": 0.05, "fp8": 0.05}  # allowed relative perplexity increase


def load_mode(model: str, mode: str) -> api.LLM:
    if mode == "float32":
        return api.load(model, dtype="float32")
    if mode == "native":
        return api.load(model)
    return api.load(model, quant=mode)


def weight_mb(model: torch.nn.Module) -> float:
    """Megabytes of parameters and buffers, each shared tensor once (call before setup_cache)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def native_path(model: torch.nn.Module) -> str:
    """How the packed GGUF layers compute: C++ kernels or per-call torch dequantization."""
    from llamaherd.quant.gguf_linear import GGUFLinear

    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    if not layers:
        return "no packed layers"
    kinds = sorted({f"{m.qtype.name} {'kernels' if m.packed else 'dequantize'}" for m in layers})
    return ", ".join(kinds)


@torch.inference_mode()
def decode_tok_s(runner: Runner, prompt: list[int], runs: int) -> float:
    """Batch-1 greedy decode speed through the KV cache (median of `runs`)."""
    runner.setup_cache(1, PROMPT_LEN + DECODE_LEN + 1)
    speeds = []
    for _ in range(runs + 1):  # the first run warms up
        ids = torch.tensor([prompt])
        tok = runner.forward(ids, torch.arange(PROMPT_LEN)[None],
                             output_index=torch.tensor([PROMPT_LEN - 1])).argmax(-1)
        t0 = time.perf_counter()
        for i in range(DECODE_LEN):
            pos = torch.tensor([[PROMPT_LEN + i]])
            tok = runner.forward(tok[:, None], pos,
                                 output_index=torch.zeros(1, dtype=torch.long)).argmax(-1)
        speeds.append(DECODE_LEN / (time.perf_counter() - t0))
    runner.model.drop_cache()
    return statistics.median(speeds[1:])


def run_mode(model_name: str, mode: str, text: str, runs: int) -> dict[str, object]:
    t0 = time.perf_counter()
    llm = load_mode(model_name, mode)
    fuse_projections(llm.model)  # runtime.prepare fuses packed GGUF models by itself
    load_s = time.perf_counter() - t0
    row: dict[str, object] = {"mode": mode, "load_s": round(load_s, 2),
                              "weights_mb": round(weight_mb(llm.model), 1)}
    if mode == "native":
        row["path"] = native_path(llm.model)
    t0 = time.perf_counter()
    row["perplexity"] = perplexity(llm, text)
    row["perplexity_s"] = round(time.perf_counter() - t0, 1)
    prompt = llm.tokenizer.encode(text)[:PROMPT_LEN]
    row["decode_tok_s"] = round(decode_tok_s(llm.runner, prompt, runs), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["float32", "native", *MODES])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = eval_text()

    rows = []
    for mode in args.modes:
        try:
            rows.append(run_mode(args.model, mode, text, args.runs))
        except Exception as exc:  # noqa: BLE001 - report a mode that cannot run, keep the rest
            rows.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()

    base = next((r for r in rows if r["mode"] == "float32" and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
            r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        if r["mode"] in TARGETS and "perplexity_change" in r:
            r["within_target"] = r["perplexity_change"] <= TARGETS[r["mode"]]

    print(f"\n{args.model}, {args.threads} threads, {len(text.split())}-word text\n")
    print(f"{'mode':8} {'perplexity':>10} {'vs f32':>8} {'target':>7} {'decode tok/s':>13} "
          f"{'vs f32':>7} {'weights MB':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:8} failed: {r['error']}")
            continue
        target = f"<{TARGETS[r['mode']]:.0%}" if r["mode"] in TARGETS else ""
        print(f"{r['mode']:8} {r['perplexity']:10.3f} {r.get('perplexity_change', 0):+8.2%} "
              f"{target:>7} {r['decode_tok_s']:13.1f} {r.get('decode_speedup', 1):6.2f}x "
              f"{r['weights_mb']:11.1f}")
    native = next((r for r in rows if r["mode"] == "native"), None)
    if native and "path" in native:
        print(f"\nnative layers: {native['path']}")

    RESULTS.mkdir(exist_ok=True)
    out = {"model": args.model, "threads": args.threads, "torch": torch.__version__,
           "cpu": cpu_name(), "window": 512, "stride": 256,
           "decode_tokens": DECODE_LEN, "prompt_tokens": PROMPT_LEN, "rows": rows}
    (RESULTS / "quality.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'quality.json'}")


if __name__ == "__main__":
    main()
