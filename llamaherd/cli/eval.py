"""`llamaherd eval mc|ppl`: multiple-choice accuracy and perplexity of a model (llamaherd.eval)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llamaherd.cli.common import UserError, friendly
from llamaherd.hub import DEFAULT_MODEL

if TYPE_CHECKING:
    from llamaherd.api import LLM


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate a model: multiple-choice tasks (mc) and perplexity (ppl)."""


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags that pick and load the model, shared by every evaluation."""
    options = [
        click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                     help="A registered name, a GGUF file, a Hugging Face or Meta directory."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     default=None, help="Dequantize the weights to this type (default: packed "
                                        "GGUF weights as they are; float32 scores exactly)."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="torch CPU threads (default: torch's choice)."),
        click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Also write the results (and each item's) as JSON here."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _load(model: str, dtype: str | None, threads: int | None) -> LLM:
    import torch

    from llamaherd.api import load

    if threads is not None:
        torch.set_num_threads(threads)
    return load(model, dtype=dtype)


def _progress(label: str) -> Callable[[int, int], None]:
    """A progress line on stderr (only when it is a terminal)."""
    def report(done: int, total: int) -> None:
        if sys.stderr.isatty():
            click.echo(f"\r{label}: {done}/{total}", err=True, nl=done == total)
    return report


def _write(output: Path | None, results: dict[str, Any]) -> None:
    if output is not None:
        output.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n",
                          encoding="utf-8")


def _run_info(model: str, dtype: str | None) -> dict[str, Any]:
    import torch

    return {"model": model, "dtype": dtype or "packed", "threads": torch.get_num_threads()}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


@eval_group.command()
@click.option("--task", "-t", "tasks", multiple=True, required=True,
              help="A task name (arc-easy, arc-challenge, hellaswag, piqa, boolq, winogrande, "
                   'mmlu) or a JSONL file of {"query", "choices", "gold"} rows; repeatable.')
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Score only the first N items of each task.")
@model_options
@friendly
def mc(tasks: Sequence[str], limit: int | None, model: str, dtype: str | None,
       threads: int | None, output: Path | None) -> None:
    """Multiple-choice accuracy by log-likelihood (lm-eval's acc, acc_norm and acc_bytes, each
    with its standard error), zero-shot."""
    from llamaherd.eval import TASKS, load_items, multiple_choice

    chosen = {t: load_items(t, limit) for t in tasks}  # every task read before the model loads
    llm = _load(model, dtype, threads)
    results: dict[str, Any] = {**_run_info(model, dtype), "limit": limit, "tasks": {}}
    click.echo(f"{'task':16} {'n':>6} {'acc':>7} {'±':>5} {'acc_norm':>8} {'±':>5} "
               f"{'seconds':>8}")
    for task, items in chosen.items():
        t0 = time.perf_counter()
        result = multiple_choice(llm, items, progress=_progress(task))
        seconds = time.perf_counter() - t0
        m = result.metrics
        click.echo(f"{task:16} {result.n:6d} {_pct(m['acc']):>7} {_pct(m['acc_stderr']):>5} "
                   f"{_pct(m['acc_norm']):>8} {_pct(m['acc_norm_stderr']):>5} {seconds:8.1f}")
        entry = {"seconds": round(seconds, 2), **result.to_dict()}
        if task in TASKS:
            entry = {"split": TASKS[task].split, "lm_eval_task": TASKS[task].lm_eval,
                     "lm_eval_metrics": list(TASKS[task].metrics), **entry}
        results["tasks"][task] = entry
        _write(output, results)  # after each task, so a long run keeps what it finished


def _texts(data: Path | None, dataset: str | None, field: str, limit: int | None) -> list[str]:
    """The documents to score: a plain-text file (one document), a JSONL file or a named
    dataset (one document per row's `field`), or the fixed evaluation text."""
    from llamaherd import datasets
    from llamaherd.eval import eval_text

    if data is not None and dataset is not None:
        raise click.UsageError("give --data or --dataset, not both")
    if data is not None and data.suffix != ".jsonl":
        texts = [data.read_text(encoding="utf-8")]
    elif data is not None or dataset is not None:
        if data is not None:
            lines = data.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        else:
            rows = datasets.rows(dataset)
        missing = next((i for i, r in enumerate(rows) if not isinstance(r.get(field), str)), None)
        if missing is not None:
            raise UserError(f"row {missing + 1} of {data or dataset} has no text field "
                            f"{field!r} (choose one with --field)")
        texts = [r[field] for r in rows]
    else:
        texts = [eval_text()]
    return texts[:limit]


@eval_group.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A text file (one document) or a JSONL file (one a row).")
@click.option("--dataset", default=None, help="A named dataset (llamaherd dataset lists them).")
@click.option("--field", default="text", show_default=True,
              help="The text field of JSONL or dataset rows.")
@click.option("--window", type=click.IntRange(2), default=512, show_default=True,
              help="Tokens per window: each token is scored with up to window - 1 before it.")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="Tokens between window starts (default: window / 2).")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Score only the first N documents.")
@model_options
@friendly
def ppl(data: Path | None, dataset: str | None, field: str, window: int, stride: int | None,
        limit: int | None, model: str, dtype: str | None, threads: int | None,
        output: Path | None) -> None:
    """Perplexity and bits per byte over documents (default: the fixed evaluation text), each
    document scored with sliding windows (Hugging Face's strided scheme)."""
    from llamaherd.eval import corpus_perplexity

    texts = _texts(data, dataset, field, limit)
    stride = stride or max(1, window // 2)
    llm = _load(model, dtype, threads)
    t0 = time.perf_counter()
    result = corpus_perplexity(llm, texts, window=window, stride=stride,
                               progress=_progress("windows"))
    seconds = time.perf_counter() - t0
    click.echo(f"perplexity {result.perplexity:.4f}  bits/byte {result.bits_per_byte:.4f}  "
               f"({result.tokens} tokens in {result.documents} documents, {seconds:.1f} s)")
    _write(output, {**_run_info(model, dtype), "data": str(data or dataset or "eval_text"),
                    "window": window, "stride": stride, "seconds": round(seconds, 2),
                    **result.to_dict()})
