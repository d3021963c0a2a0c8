"""Serving benchmark: aggregate output tokens/s and time to first token at 1, 4, 8 and 16 concurrent
streamed chat answers, llamaherd's server against llama-cpp-python's OpenAI server on the same GGUF.

    .venv/bin/python bench/bench_serve.py [--threads 2] [--levels 1,4,8,16] [--max-tokens 128]
    .venv/bin/python bench/bench_serve.py --smoke      # a few seconds: levels 1,2 and 8 tokens
    .venv/bin/python bench/bench_serve.py --shared-prefix   # prefix caching on vs off

Every stream asks for `--max-tokens` tokens of a long answer to its own question (numbered, so
no prompt is answered from a cache: each is prefilled), and gets all of them: `min_tokens` (a
request field both servers take, as vLLM's does) holds off the end-of-turn token, so every level
does the same work (with `--allow-early-stop` a stream that ends early leaves the others to run
as a smaller batch while the level's wall time still waits for the longest). Tokens are counted
from the server's usage report when it sends one, else one per content chunk. Each server runs
all levels `--rounds` times over (default 3) and each figure is the median of its rounds: one
round of a level takes under a second here, and single rounds of the same level differ by
several percent.
Results go to bench/results/serve.json. llama-cpp-python is optional: without it (or its server
extras) only llamaherd is measured, and the script says so.

The load generator shares the cores with the server it measures, so it is kept light: it reads
the streams with aiohttp (whose HTTP parser is C), at about half the CPU per token of httpx's
streaming API, takes whatever bytes have arrived at once rather than a line at a time, and parses
events only until the first content and then the usage report (from a server that sends none,
every event, to count them). Both servers get the same client.

--shared-prefix measures llamaherd alone, with prefix caching on and off (`--no-prefix-cache`):
every request starts with the same ~400-token system prompt and asks its own question, as a chat
application's requests do (results in bench/results/serve_prefix.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests/support

from llamaherd import hub
from llamaherd.hub import DEFAULT_MODEL
from tests.support.server import ServerProcess, free_port, llamaherd_server

RESULTS = Path(__file__).parent / "results" / "serve.json"
PREFIX_RESULTS = Path(__file__).parent / "results" / "serve_prefix.json"
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a bicycle works.",
    "Describe a journey across the desert, step by step.",
    "Write a long letter to a friend about your garden.",
]
# about 400 tokens for the SmolLM2 tokenizer (--shared-prefix)
SYSTEM_PROMPT = "You are the writing assistant of a small publishing house. " + " ".join(
    f"Guideline {i}: write vivid, concrete prose, keep a steady voice, and prefer short "
    f"paragraphs over long ones." for i in range(1, 18))
READERS = itertools.count()  # makes every question unique


async def one_stream(client: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
                     usage: bool, system: str | None = None, full: bool = True) -> dict[str, float]:
    """One streamed chat answer: seconds to the first content, total seconds, tokens. full: all
    max_tokens of it (min_tokens, which both servers take, holds off the end-of-turn token)."""
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.8,
                            "seed": 1, "stream": True, "messages": messages}
    if usage:
        body["stream_options"] = {"include_usage": True}
    if full:
        body["min_tokens"] = max_tokens
    start = time.perf_counter()
    first: float | None = None
    chunks, reported = 0, None
    async with client.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
        rest = b""
        async for data in r.content.iter_any():  # whatever has arrived: often many events
            *lines, rest = (rest + data).split(b"\n")
            for line in lines:
                if not line.startswith(b"data: {"):
                    continue
                # a server that reports usage is counted from it: past the first content, only
                # its usage event needs parsing (whose usage is an object, not null)
                if usage and first is not None and b'"usage":{' not in line.replace(b" ", b""):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    reported = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "seconds": end - start,
            "tokens": float(reported if reported is not None else chunks)}


async def level(url: str, model: str, streams: int, max_tokens: int, usage: bool,
                system: str | None = None, full: bool = True) -> dict[str, Any]:
    """`streams` concurrent answers; aggregate tokens/s over the wall time of all of them. Every
    question is unique from its first word (a request number), so a server's prefix cache finds
    at most the chat template's part (with a system prompt: that prompt), never a whole prompt."""
    def prompt(i: int) -> str:
        return f"(Request {next(READERS)}) {PROMPTS[i % len(PROMPTS)]}"

    limits = aiohttp.TCPConnector(limit=0)  # no cap on connections: every stream at once
    async with aiohttp.ClientSession(connector=limits,
                                     timeout=aiohttp.ClientTimeout(total=1800)) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, url, model, prompt(i), max_tokens, usage,
                                                 system, full) for i in range(streams)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in runs)
    ttfts = [r["ttft"] for r in runs]
    return {"streams": streams, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_max_s": max(ttfts)}


METRICS = ("tokens", "wall_s", "tokens_per_s", "ttft_mean_s", "ttft_max_s")


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's rounds as one row: the median of each figure."""
    return {"streams": rows[0]["streams"], "rounds": len(rows),
            **{key: statistics.median(r[key] for r in rows) for key in METRICS}}


def measure(name: str, server: ServerProcess, levels: list[int], max_tokens: int,
            usage: bool, warmup_timeout: float = 180.0, system: str | None = None,
            rounds: int = 1, full: bool = True) -> list[dict[str, Any]]:
    """Run every level against `server` (all levels once, `rounds` times over; each figure the
    median of its rounds); raises RuntimeError if it cannot answer a short warm-up request
    within `warmup_timeout` seconds."""
    print(f"starting {name} ...", file=sys.stderr, flush=True)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    with server:
        model = warm_up(name, server, usage, warmup_timeout, system)
        for _ in range(rounds):
            for n in levels:
                row = asyncio.run(level(server.url, model, n, max_tokens, usage, system, full))
                show(name, row)
                runs[n].append(row)
    return [medians(runs[n]) for n in levels]


def warm_up(name: str, server: ServerProcess, usage: bool, timeout: float,
            system: str | None = None) -> str:
    """The served model's id, once the server has answered a short request."""
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    try:
        asyncio.run(asyncio.wait_for(level(server.url, model, 1, 8, usage, system), timeout))
    except (TimeoutError, asyncio.TimeoutError, aiohttp.ClientError) as e:
        raise RuntimeError(f"{name} did not answer a warm-up request within "
                           f"{timeout:.0f}s ({type(e).__name__})") from e
    return model


def show(name: str, row: dict[str, Any]) -> None:
    print(f"  {name:10s} {row['streams']:3d} streams: {row['tokens_per_s']:7.1f} tok/s, "
          f"TTFT {row['ttft_mean_s'] * 1000:7.0f} ms", file=sys.stderr, flush=True)


def llama_cpp_server(model_path: Path, threads: int) -> ServerProcess | str:
    """llama-cpp-python's server, or the reason it cannot run."""
    try:
        import llama_cpp
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        return (f"llama-cpp-python's server is not importable ({e}); install it with "
                f"`pip install 'llama-cpp-python[server]'` to compare")
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host",
            "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_ctx", "4096",
            "--interrupt_requests", "False"]
    return ServerProcess(argv, port, ready_path="/v1/models")


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    names = list(results)
    head = f"{'streams':>8} " + " ".join(f"{n + ' tok/s':>18} {n + ' TTFT ms':>18}" for n in names)
    if len(names) == 2:
        head += f" {'tok/s ratio':>12} {'TTFT ratio':>11}"
    lines = [head]
    for i, row in enumerate(results[names[0]]):
        cells = [f"{row['streams']:>8}"]
        for n in names:
            r = results[n][i]
            cells.append(f"{r['tokens_per_s']:>18.1f} {r['ttft_mean_s'] * 1000:>18.0f}")
        if len(names) == 2:
            a, b = results[names[0]][i], results[names[1]][i]
            cells.append(f"{a['tokens_per_s'] / b['tokens_per_s']:>12.2f} "
                         f"{a['ttft_mean_s'] / b['ttft_mean_s']:>11.2f}")
        lines.append(" ".join(cells))
    if len(names) == 2:
        lines.append(f"ratios are {names[0]} / {names[1]} (tok/s: higher is better for "
                     f"{names[0]}; TTFT: lower is better)")
    return "\n".join(lines)


def shared_prefix(model: str, levels: list[int], max_tokens: int, threads: int, rounds: int,
                  save: bool, full: bool = True) -> None:
    """Prefix caching on vs off, every request behind the same long system prompt.

    Both servers run at once and take turns, level by level, `rounds` times, so that a change in
    the machine's load hits both alike; each figure is the median over the rounds.
    """
    switches = {"cached": "--prefix-cache", "uncached": "--no-prefix-cache"}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {k: [] for k in levels}
                                                        for n in switches}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, switch in switches.items():
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            servers[name] = stack.enter_context(llamaherd_server(
                model, "--max-seqs", str(max(levels)), "--ctx-size", "1024", switch,
                threads=threads))
            served = warm_up(name, servers[name], True, 180.0, SYSTEM_PROMPT)
        for k in levels:
            for _ in range(rounds):
                for name, server in servers.items():
                    row = asyncio.run(level(server.url, served, k, max_tokens, True,
                                            SYSTEM_PROMPT, full))
                    show(name, row)
                    runs[name][k].append(row)
    results = {name: [medians(by_level[k]) for k in levels] for name, by_level in runs.items()}
    print(table(results))
    if save:
        PREFIX_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        PREFIX_RESULTS.write_text(json.dumps({
            "model": model, "threads": threads, "max_tokens": max_tokens, "rounds": rounds,
            "system_prompt_chars": len(SYSTEM_PROMPT), "machine": platform.platform(),
            "python": platform.python_version(), "results": results}, indent=2) + "\n")
        print(f"wrote {PREFIX_RESULTS}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="levels 1,2 with 8 tokens, no JSON")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="llamaherd with prefix caching on vs off, a ~400-token system prompt")
    ap.add_argument("--rounds", type=int, default=3,
                    help="times each level runs on each server (the median is reported)")
    ap.add_argument("--allow-early-stop", action="store_true",
                    help="let answers end before --max-tokens (no min_tokens)")
    args = ap.parse_args()
    levels = [1, 2] if args.smoke else [int(x) for x in args.levels.split(",")]
    max_tokens = 8 if args.smoke else args.max_tokens
    if args.shared_prefix:
        shared_prefix(args.model, levels, max_tokens, args.threads,
                      1 if args.smoke else args.rounds, save=not args.smoke,
                      full=not args.allow_early_stop)
        return
    model_path = hub.pull(args.model) if args.model in hub.REGISTRY else Path(args.model)

    results: dict[str, list[dict[str, Any]]] = {}
    ours = llamaherd_server(args.model, "--max-seqs", str(max(levels)), "--ctx-size", "1024",
                            threads=args.threads)
    rounds = 1 if args.smoke else args.rounds
    full = not args.allow_early_stop
    results["llamaherd"] = measure("llamaherd", ours, levels, max_tokens, usage=True,
                                   rounds=rounds, full=full)
    note = None
    if args.skip_llama_cpp:
        note = "llama-cpp-python skipped (--skip-llama-cpp)"
    else:
        other = llama_cpp_server(model_path, args.threads)
        if isinstance(other, str):
            note = other
        else:
            try:
                results["llama.cpp"] = measure("llama.cpp", other, levels, max_tokens,
                                               usage=False, rounds=rounds, full=full)
            except RuntimeError as e:
                note = f"llama-cpp-python's server failed: {e}"
    if note:
        print(f"note: {note}; measuring llamaherd alone", file=sys.stderr)
    print(table(results))
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "model": args.model, "threads": args.threads, "max_tokens": max_tokens,
            "rounds": rounds, "min_tokens": max_tokens if full else 0,
            "machine": platform.platform(), "python": platform.python_version(),
            "note": note, "results": results}, indent=2) + "\n")
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
