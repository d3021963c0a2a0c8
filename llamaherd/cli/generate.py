"""`llamaherd run` (chat, interactive or one question) and `llamaherd generate` (raw completion)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llamaherd.cli.common import friendly, sampling_options, to_sampling
from llamaherd.hub import DEFAULT_MODEL

if TYPE_CHECKING:
    from llamaherd.api import LLM

HELP = "Commands: /system TEXT (set the system prompt and start over), /reset, /exit. " \
       "Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt exits."


def _is_model(name: str) -> bool:
    from llamaherd import hub

    return name in hub.REGISTRY or Path(name).expanduser().exists()


def _load(model: str, dtype: str | None, quant: str | None = None) -> tuple[LLM, float]:
    from llamaherd.api import load

    t0 = time.perf_counter()
    llm = load(model, dtype=dtype, quant=quant)
    return llm, time.perf_counter() - t0


def _echo_stream(events: Iterator[Any], text: list[str]) -> str | None:
    """Print text deltas as they come, appending them to `text`; return the finish reason."""
    reason = None
    for e in events:
        if e.text:
            click.echo(e.text, nl=False)
            text.append(e.text)
        reason = e.finish_reason or reason
    return reason


@click.command()
@click.argument("model", required=False)
@click.argument("question", required=False)
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@friendly
def run(model: str | None, question: str | None, system: str | None, **opts: Any) -> None:
    """Chat with MODEL (default smollm2-135m-instruct); with QUESTION, answer it and exit."""
    if model is not None and question is None and not _is_model(model):
        model, question = None, model  # one argument that is not a model: the question
    llm, _ = _load(model or DEFAULT_MODEL, opts.pop("dtype"), opts.pop("quant"))
    sampling = to_sampling(opts)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if question is not None:
        history.append({"role": "user", "content": question})
        reason = _echo_stream(llm.chat_events(history, **sampling), [])
        click.echo()
        if reason == "length":
            click.echo("[stopped: token limit reached]", err=True)
        return
    _chat_loop(llm, history, sampling)


def _chat_loop(llm: LLM, history: list[dict[str, str]], sampling: dict[str, Any]) -> None:
    click.echo(HELP, err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/reset":
            history[:] = [m for m in history if m["role"] == "system"]
            click.echo("[conversation cleared]", err=True)
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            history[:] = [{"role": "system", "content": text}] if text else []
            click.echo("[system prompt set; conversation cleared]", err=True)
            continue
        if line.startswith("/"):
            click.echo(f"unknown command {line.split()[0]}. {HELP}", err=True)
            continue
        history.append({"role": "user", "content": line})
        answer: list[str] = []
        events: Any = None
        try:
            events = llm.chat_events(history, **sampling)
            reason = _echo_stream(events, answer)
            click.echo()
            if reason == "length":
                click.echo("[stopped: token limit reached]", err=True)
        except KeyboardInterrupt:
            if events is not None:
                events.close()  # cancels the sequence
            click.echo("\n[interrupted]", err=True)
        history.append({"role": "assistant", "content": "".join(answer)})


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--json", "as_json", is_flag=True,
              help="Print text, token ids, finish reason, timings and usage as JSON.")
@click.option("--draft", default=None,
              help="Speculative decoding (greedy): 'ngram' for prompt lookup, or a smaller "
                   "model sharing MODEL's vocabulary.")
@click.option("--draft-k", type=int, default=4, show_default=True,
              help="Draft tokens checked per forward.")
@sampling_options
@friendly
def generate(model: str, prompt: str, as_json: bool, draft: str | None, draft_k: int,
             **opts: Any) -> None:
    """Complete PROMPT with MODEL (no chat template)."""
    from llamaherd.generation.generate import to_token_ids

    dtype = opts.pop("dtype")
    llm, load_s = _load(model, dtype, opts.pop("quant"))
    draft_model = None if draft in (None, "ngram") else _load(draft, dtype)[0]
    ids = to_token_ids(llm.tokenizer, prompt).ids
    t0 = time.perf_counter()
    first = last = t0
    events = []
    for e in llm.events(ids, draft=draft_model or draft, draft_k=draft_k, **to_sampling(opts)):
        last = time.perf_counter()
        if not events:
            first = last
        events.append(e)
        if not as_json and e.text:
            click.echo(e.text, nl=False)
    seq = events[-1].seq
    if seq.truncated:
        click.echo(f"[prompt truncated: {seq.truncated} oldest tokens dropped]", err=True)
    if not as_json:
        click.echo()
        if seq.draft_stats is not None:
            click.echo(f"[speculative: {seq.draft_stats.acceptance_rate:.0%} of draft tokens "
                       f"accepted]", err=True)
        if seq.finish_reason == "length":
            click.echo("[stopped: token limit reached]", err=True)
        return
    prompt_n, new_n = len(seq.prompt_ids), len(events)  # new_n counts a final stop token
    prefill_s, decode_s = first - t0, last - first
    extra = {}
    if seq.draft_stats is not None:
        st = seq.draft_stats
        extra["speculative"] = {"acceptance_rate": round(st.acceptance_rate, 4),
                                "drafted": st.drafted, "accepted": st.accepted,
                                "target_forwards": st.target_forwards}
    click.echo(json.dumps({
        "text": seq.text,
        "token_ids": seq.output_ids,
        "finish_reason": seq.finish_reason,
        "timings": {"load_s": round(load_s, 4),
                    "prefill_tok_s": round(prompt_n / prefill_s, 2) if prefill_s > 0 else None,
                    "decode_tok_s": round((new_n - 1) / decode_s, 2) if decode_s > 0 else None},
        "usage": {"prompt_tokens": prompt_n, "completion_tokens": len(seq.output_ids),
                  "total_tokens": prompt_n + len(seq.output_ids),
                  "truncated_prompt_tokens": seq.truncated},
        **extra,
    }))
    sys.stdout.flush()

