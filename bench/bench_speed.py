"""Side-by-side CPU speed: llamaherd vs llama.cpp (llama-cpp-python) vs transformers, same GGUF.

Each engine runs in its own subprocess (so load time and peak RSS are its own), several times;
the medians are printed with ratios to llama.cpp, written to bench/results/speed.json and drawn
to bench/results/speed.png.

    .venv/bin/python bench/bench_speed.py [--model smollm2-135m-instruct] [--threads 2] [--runs 3]

Figures: load (s), prefill tok/s (one 512-token prompt of random ids), decode tok/s (batch 1,
128 greedy tokens after a chat prompt in the model's own format), decode aggregate tok/s at batch 8,
peak RSS (MB), and the model's memory: peak RSS minus the RSS of the runtime after its imports
(Python, torch or libllama), next to 1.5 x the GGUF file plus the largest KV cache the run made.
llama-cpp-python is optional (`bash bench/build_llama_cpp.sh`); transformers is in the test extras.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PREFILL_LEN, DECODE_LEN, BATCH = 512, 128, 8
CHAT_QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _chat_prompt(path: str) -> list[int]:
    """The chat prompt every engine decodes after: the question in the model's own chat format."""
    from llamaherd import tokenizer
    from llamaherd.chat import build_prompt, chat_format

    tok = tokenizer.load(path)
    return build_prompt(chat_format(tok), [{"role": "user", "content": CHAT_QUESTION}])


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """Current resident memory: taken after the imports, it is the runtime's own baseline."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _prefill_ids() -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randint(100, 40000) for _ in range(PREFILL_LEN)]


# ---------------------------------------------------------------- one engine per subprocess

def run_llamaherd(path: str, threads: int, mode: str, chat: list[int]) -> dict[str, float]:
    """Through the same engine that serves LLM.generate, the CLI and the server."""
    import torch

    import llamaherd
    from llamaherd.generation.engine import Engine
    from llamaherd.generation.sampling import SamplingParams

    torch.set_num_threads(threads)
    import gguf  # noqa: F401 -- the libraries the loader uses are runtime, as libllama is
    import jinja2  # noqa: F401
    import tokenizers  # noqa: F401

    from llamaherd import api, kernels, tokenizer  # noqa: F401
    from llamaherd.checkpoint import gguf_load  # noqa: F401

    kernels.load()  # built once by the set-up
    baseline = _rss_mb()
    t0 = time.perf_counter()  # like llama.cpp's figure: the load call, imports done before
    llm = llamaherd.load(path, dtype=None if mode == "native" else mode)
    load_s = time.perf_counter() - t0
    model, runner = llm.model, llm.runner
    greedy = SamplingParams(max_new_tokens=DECODE_LEN, temperature=0.0, ignore_eos=True)
    with torch.inference_mode():
        # the prompt goes through the engine's prefill (in chunks of PREFILL_CHUNK positions) and
        # its first token is sampled, as for any request; no prefix cache, so nothing is reused
        ids, first = _prefill_ids(), SamplingParams(max_new_tokens=1, temperature=0.0)
        engine = Engine(runner, llm.tokenizer, rows=1, max_len=PREFILL_LEN + 1, prefix_cache=False)
        engine.add(ids[:16], first)
        engine.step()  # warm-up
        engine.add(ids, first)
        t0 = time.perf_counter()
        engine.step()
        prefill = PREFILL_LEN / (time.perf_counter() - t0)

        def decode(batch: int) -> float:
            engine = Engine(runner, llm.tokenizer, rows=batch, max_len=len(chat) + DECODE_LEN + 8)
            for _ in range(batch):
                engine.add(chat, greedy)
            engine.step()  # prefill and the first token of every sequence
            t0, produced = time.perf_counter(), 0
            while not engine.idle:
                produced += len(engine.step())
            return produced / (time.perf_counter() - t0)

        decode1 = decode(1)
        decode8 = decode(BATCH)
    a = model.args  # the largest cache set up above
    per_position = a.n_layers * 2 * a.n_kv_heads * a.head_dim * runner.kv_dtype.itemsize
    positions = max(PREFILL_LEN + 1, BATCH * (len(chat) + DECODE_LEN + 8))
    return {"load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode1,
            "decode_b8_tok_s": decode8, "peak_rss_mb": _peak_rss_mb(),
            "runtime_rss_mb": baseline, "kv_cache_mb": positions * per_position / 2**20}


def run_llama_cpp(path: str, threads: int, mode: str, chat: list[int]) -> dict[str, float]:
    from llama_cpp import Llama

    baseline = _rss_mb()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = _prefill_ids()
    llm.eval(ids[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = PREFILL_LEN / (time.perf_counter() - t0)
    llm.reset()
    llm.eval(chat)
    t0 = time.perf_counter()
    for _ in range(DECODE_LEN):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    decode1 = DECODE_LEN / (time.perf_counter() - t0)
    # llama-cpp-python's high-level API decodes one sequence at a time; batch-8 aggregate is
    # reported as not measured rather than as an 8-sequence figure it cannot produce.
    return {"load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode1,
            "decode_b8_tok_s": float("nan"), "peak_rss_mb": _peak_rss_mb(),
            "runtime_rss_mb": baseline, "kv_cache_mb": llm.n_ctx() * _kv_bytes_f16(llm) / 2**20}


def _kv_bytes_f16(llm) -> float:
    """llama.cpp's cache per position: float16 keys and values of every layer."""
    meta = llm.metadata
    arch = meta["general.architecture"]
    layers, heads = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta[f"{arch}.embedding_length"]) // heads
    return layers * 2 * kv_heads * head_dim * 2


def run_transformers(path: str, threads: int, mode: str, chat: list[int]) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    p = Path(path)
    baseline = _rss_mb()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        ids = torch.tensor([_prefill_ids()])
        model(ids[:, :16])
        t0 = time.perf_counter()
        model(ids)
        prefill = PREFILL_LEN / (time.perf_counter() - t0)

        def decode(batch: int, new: int) -> float:
            prompt = torch.tensor([chat] * batch)
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           attention_mask=torch.ones_like(prompt), pad_token_id=0)
            return batch * new / (time.perf_counter() - t0)

        decode1 = decode(1, 64)
        decode8 = decode(BATCH, 32)
    c = model.config  # float32 keys and values; the largest cache made above
    per_position = c.num_hidden_layers * 2 * c.num_key_value_heads * (
        c.hidden_size // c.num_attention_heads) * 4
    positions = max(PREFILL_LEN, BATCH * (len(chat) + 32))
    return {"load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode1,
            "decode_b8_tok_s": decode8, "peak_rss_mb": _peak_rss_mb(),
            "runtime_rss_mb": baseline, "kv_cache_mb": positions * per_position / 2**20}


RUNNERS = {"llamaherd": run_llamaherd, "llama.cpp": run_llama_cpp,
           "transformers": run_transformers}


def _child(engine: str, path: str, threads: int, mode: str, chat: list[int]) -> None:
    print(json.dumps(RUNNERS[engine](path, threads, mode, chat)))


def _measure(engine: str, path: str, threads: int, mode: str, runs: int,
             chat: list[int]) -> dict | None:
    samples = []
    for _ in range(runs):
        proc = subprocess.run(check=False, args=[sys.executable, __file__, "--child", engine, "--path", path,
                               "--chat", json.dumps(chat),
                               "--threads", str(threads), "--mode", mode],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {engine}: not measured ({tail})", file=sys.stderr)
            return None
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="llamaherd,llama.cpp,transformers")
    ap.add_argument("--mode", default="native", help="llamaherd dtype: native (packed) or float32")
    ap.add_argument("--child")
    ap.add_argument("--path")
    ap.add_argument("--chat", help="JSON list of the chat prompt's token ids (children only)")
    a = ap.parse_args()
    if a.child:
        return _child(a.child, a.path, a.threads, a.mode, json.loads(a.chat))

    from llamaherd.hub import resolve_path

    path = str(resolve_path(a.model))
    chat = _chat_prompt(path)  # tokenized here, so no engine pays for our tokenizer
    results: dict[str, dict] = {}
    for engine in a.engines.split(","):
        runs = 1 if engine == "transformers" else a.runs
        print(f"measuring {engine} ({runs} run{'s' * (runs > 1)}) ...", file=sys.stderr)
        r = _measure(engine, path, a.threads, a.mode, runs, chat)
        if r is not None:
            results[engine] = r
    report(results, a, path)


def report(results: dict[str, dict], a: argparse.Namespace, path: str) -> None:
    cols = ["load_s", "prefill_tok_s", "decode_tok_s", "decode_b8_tok_s", "peak_rss_mb"]
    ref = results.get("llama.cpp")
    print(f"\nmodel {Path(path).name}, {a.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'engine':14s}" + "".join(f"{c:>17s}" for c in cols))
    for engine, r in results.items():
        cells = []
        for c in cols:
            v = r[c]
            ratio = ""
            if ref and engine != "llama.cpp" and not math.isnan(ref[c] + v) and ref[c]:
                x = (ref[c] / v) if c in ("load_s", "peak_rss_mb") else (v / ref[c])
                ratio = f" ({x:.2f}x)"
            cells.append(f"{v:9.2f}{ratio:>8s}")
        print(f"{engine:14s}" + "".join(f"{c:>17s}" for c in cells))
    gguf_mb = Path(path).stat().st_size / 2**20
    print(f"\nmemory (MB): the model's = peak RSS - the runtime's RSS after its imports; "
          f"target <= 1.5 x GGUF ({gguf_mb:.0f}) + KV cache")
    for engine, r in results.items():
        model_mb, budget = r["peak_rss_mb"] - r["runtime_rss_mb"], 1.5 * gguf_mb + r["kv_cache_mb"]
        print(f"  {engine:14s} runtime {r['runtime_rss_mb']:6.0f}  model {model_mb:6.0f}  "
              f"(KV {r['kv_cache_mb']:.0f}, target {budget:.0f}: {model_mb / budget:.2f}x)")
    if "llamaherd" in results:
        r = results["llamaherd"]
        print(f"llamaherd batch-8 / batch-1 decode: {r['decode_b8_tok_s'] / r['decode_tok_s']:.2f}x")
        if "transformers" in results:
            print(f"llamaherd / transformers decode: "
                  f"{r['decode_tok_s'] / results['transformers']['decode_tok_s']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = {"model": Path(path).name, "threads": a.threads, "mode": a.mode,
           "machine": platform.platform(), "results": results,
           "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "speed.json").write_text(json.dumps(out, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, c in zip(axes, ["prefill_tok_s", "decode_tok_s", "load_s"]):
            names = list(results)
            ax.bar(names, [results[n][c] for n in names], color=["#4c72b0", "#dd8452", "#55a868"])
            ax.set_title(c)
        fig.tight_layout()
        fig.savefig(RESULTS / "speed.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
    print(f"wrote {RESULTS / 'speed.json'}")


if __name__ == "__main__":
    main()
