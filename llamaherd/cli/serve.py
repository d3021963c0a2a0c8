"""`llamaherd serve`: load a model and run the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

import click

from llamaherd.cli.common import UserError, friendly
from llamaherd.hub import DEFAULT_MODEL


@click.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-seqs", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Sequences generated together (KV-cache rows).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Requests allowed to wait for a free row; beyond it the server answers 429.")
@click.option("--ctx-size", default=2048, show_default=True, type=click.IntRange(16, 1 << 20),
              help="Tokens per sequence, prompt plus answer (capped at the model's window).")
@click.option("--model-id", default=None, help="The name clients use (default: MODEL).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="torch CPU threads (default: torch's choice).")
@click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: fastest).")
@click.option("--quant", type=click.Choice(["int8", "int4", "fp8", "q8_0"]), default=None,
              help="Quantize float weights at load time: weight-only int8 / int4 / fp8, "
                   "or q8_0 packed for the C++ kernels (fast).")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Reuse a prompt prefix (e.g. a shared system prompt) still in the KV cache.")
@click.option("--stream-interval", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="Seconds between writes of a stream's new tokens (0: every token as made).")
@click.option("--input-shield", metavar="GUARD", default=None,
              help="A Llama Guard model (name or path; MODEL itself to share its engine) that "
                   "judges each request's last user message; flagged ones get the refusal.")
@click.option("--output-shield", metavar="GUARD", default=None,
              help="A Llama Guard model that judges each answer as it is made; a flagged answer "
                   "is stopped and replaced by the refusal (finish_reason content_filter).")
@click.option("--prompt-shield", metavar="CLASSIFIER", default=None,
              help="A Prompt Guard classifier that flags jailbreaks and prompt injections in "
                   "each request's last user message.")
@click.option("--shield-every", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Answer tokens between two output-shield checks (and one at the end); the "
                   "client gets the answer as each check passes.")
@friendly
def serve(model: str, host: str, port: int, max_seqs: int, max_queue: int, ctx_size: int,
          model_id: str | None, threads: int | None, dtype: str | None,
          quant: str | None, prefix_cache: bool, stream_interval: float,
          input_shield: str | None, output_shield: str | None, prompt_shield: str | None,
          shield_every: int) -> None:
    """Serve MODEL behind an OpenAI-compatible API, with a web chat page at /."""
    import torch
    import uvicorn

    from llamaherd.api import load
    from llamaherd.serve.app import create_app
    from llamaherd.serve.shields import load_shields

    _check_listen(host, port)  # before the model loads, so a busy port fails at once
    # The engine thread does the model's work with `threads` threads; this one keeps to one, so
    # that only one OpenMP team competes for the cores (see Scheduler).
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    llm = load(model, dtype=dtype, quant=quant)
    if model_id is None:
        model_id = model if "/" not in model and not model.endswith(".gguf") else \
            llm.checkpoint.path.stem
    shields = load_shields(input_shield, output_shield, prompt_shield, model, llm,
                           every=shield_every, dtype=dtype, quant=quant)
    app = create_app(llm, model_id, max_seqs=max_seqs, max_queue=max_queue, context=ctx_size,
                     threads=threads, prefix_cache=prefix_cache,
                     stream_interval=stream_interval, shields=shields)
    click.echo(f"serving {model_id} on http://{host}:{port}/  (OpenAI API at /v1)", err=True)
    if shields is not None:
        names = ", ".join(f"{s.identifier} ({'/'.join(s.stages)})" for s in shields.all())
        click.echo(f"shields: {names}", err=True)
    # uvicorn takes uvloop and httptools (dependencies) where installed: cheaper per token than
    # its pure-Python defaults (asyncio, h11), for an event loop that shares the cores with the
    # model's threads (docs/performance.md)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


def _check_listen(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve host {host!r}: {e.strerror}") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e

