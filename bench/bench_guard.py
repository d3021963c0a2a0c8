"""llamaherd's own guards: quality on the held-out split, checks per second, latency per check,
and the time to first token a shield adds in the server.

- quality: llamaherd-guard (Llama Guard protocol) and llamaherd-prompt-guard (Prompt Guard
  protocol) judged on the held-out split of llamaherd.safety.data (sources, groups and labels as
  the build used them; nothing held out was trained on). The build writes the same report; this
  recomputes it from the cached models.
- speed: checks/s over the held-out user prompts in one batch (the engine's rows fill up), and
  the median latency of one check at a time.
- serving: median time to first token of short streamed chat requests, one at a time, from
  `llamaherd serve` on the default model without a shield and with `--input-shield
  llamaherd-guard` (and `--prompt-shield llamaherd-prompt-guard`), each server in turn.

The guards are built on first use (`llamaherd pull llamaherd-guard`: ~15-30 minutes here).
Writes bench/results/guard.json.

    .venv/bin/python bench/bench_guard.py [--sections quality,speed,serving] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests/support

from llamaherd import hub
from llamaherd.hub import DEFAULT_MODEL
from tests.support.server import llamaherd_server

RESULTS = Path(__file__).parent / "results" / "guard.json"
QUESTIONS = ["What is the capital of France?", "Give me a tip for sleeping better.",
             "How do I boil an egg?", "Name three primary colours.",
             "What does a bicycle chain do?"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def quality() -> dict[str, Any]:
    from llamaherd.api import load
    from llamaherd.safety import LlamaGuard, data, load_prompt_guard
    from llamaherd.safety.build import evaluate_guard, evaluate_prompt_guard
    from llamaherd.safety.categories import LLAMA_GUARD_3_1B

    guard = LlamaGuard(load(hub.resolve("llamaherd-guard")), categories=LLAMA_GUARD_3_1B)
    started = time.perf_counter()
    out = {"llamaherd-guard": evaluate_guard(guard, data.split(data.guard_items()).test)}
    out["llamaherd-guard"]["seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    prompt_guard = load_prompt_guard("llamaherd-prompt-guard")
    out["llamaherd-prompt-guard"] = evaluate_prompt_guard(
        prompt_guard, data.split(data.prompt_items()).test)
    out["llamaherd-prompt-guard"]["seconds"] = time.perf_counter() - started
    return out


def speed() -> dict[str, Any]:
    from llamaherd.api import load
    from llamaherd.safety import LlamaGuard, data, load_prompt_guard
    from llamaherd.safety.categories import LLAMA_GUARD_3_1B

    prompts = [i.messages for i in data.split(data.guard_items()).test
               if i.messages[-1]["role"] == "user"]
    texts = [i.text for i in data.split(data.prompt_items()).test]
    guard = LlamaGuard(load(hub.resolve("llamaherd-guard")), categories=LLAMA_GUARD_3_1B)
    prompt_guard = load_prompt_guard("llamaherd-prompt-guard")
    guard.check_many(prompts[:4], on_error="flag")  # warm up: kernels, cache, prefix
    prompt_guard.check_many(texts[:4])
    out: dict[str, Any] = {}
    for name, many, one, items in (
            ("llamaherd-guard", lambda xs: guard.check_many(xs, on_error="flag"),
             lambda x: guard.check_many([x], on_error="flag"), prompts),
            ("llamaherd-prompt-guard", prompt_guard.check_many,
             lambda x: prompt_guard.check_many([x]), texts)):
        started = time.perf_counter()
        many(items)
        batch_s = time.perf_counter() - started
        latencies = []
        for item in items[:20]:
            started = time.perf_counter()
            one(item)
            latencies.append(time.perf_counter() - started)
        out[name] = {"checks": len(items), "checks_per_s": len(items) / batch_s,
                     "latency_ms": 1000 * statistics.median(latencies)}
        print(f"{name}: {out[name]['checks_per_s']:.1f} checks/s batched, "
              f"{out[name]['latency_ms']:.0f} ms a check alone", flush=True)
    return out


def ttft(url: str, requests: int) -> float:
    """Median time to the first content delta of short streamed chats, one at a time."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    times = []
    for i in range(requests + 2):
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL, stream=True, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        if i >= 2 and first is not None:  # the first two warm the server up
            times.append(first)
    return statistics.median(times)


def serving(requests: int, threads: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, options in (("no shield", []),
                          ("input shield", ["--input-shield", "llamaherd-guard"]),
                          ("input + prompt shields", ["--input-shield", "llamaherd-guard",
                                                      "--prompt-shield",
                                                      "llamaherd-prompt-guard"])):
        with llamaherd_server(DEFAULT_MODEL, *options, threads=threads) as server:
            out[name] = {"ttft_ms": 1000 * ttft(server.url, requests)}
        print(f"{name}: TTFT {out[name]['ttft_ms']:.0f} ms", flush=True)
    base = out["no shield"]["ttft_ms"]
    for row in out.values():
        row["added_ms"] = row["ttft_ms"] - base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="quality,speed,serving")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the servers (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    hub.pull("llamaherd-guard")
    hub.pull("llamaherd-prompt-guard")
    results: dict[str, Any] = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
                               "threads": args.threads}
    sections = args.sections.split(",")
    if "quality" in sections:
        results["quality"] = quality()
        for name, report in results["quality"].items():
            for key in ("prompts", "responses", "malicious", "jailbreak", "injection_only"):
                if key in report:
                    s = report[key].get("overall", report[key])
                    print(f"{name} {key}: precision {s['precision']:.3f} recall "
                          f"{s['recall']:.3f} F1 {s['f1']:.3f} FPR {s['fpr']:.3f}", flush=True)
    if "speed" in sections:
        results["speed"] = speed()
    if "serving" in sections:
        results["serving"] = serving(args.requests, args.threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
