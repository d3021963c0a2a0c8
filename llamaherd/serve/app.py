"""The FastAPI app: the server's state built at startup, its routes and its middleware."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from fastapi import FastAPI

from llamaherd.generation.constraints import Guidance
from llamaherd.generation.engine import Engine
from llamaherd.serve.errors import install_handlers
from llamaherd.serve.metrics import Metrics
from llamaherd.serve.middleware import BodyLimit, CountRequests, ExpectJobs
from llamaherd.serve.openai_format import TokenText, now
from llamaherd.serve.routes import router
from llamaherd.serve.scheduler import Scheduler
from llamaherd.serve.shields import LlamaGuardShield, Shields
from llamaherd.serve.state import ServerState

if TYPE_CHECKING:
    from llamaherd.api import LLM


def create_app(llm: LLM, model_id: str, *, max_seqs: int = 8, max_queue: int = 64,
               context: int = 2048, max_body: int = 4 << 20,
               threads: int | None = None, prefix_cache: bool = True,
               stream_interval: float = 0.0, shields: Shields | None = None) -> FastAPI:
    """An app serving `llm` as `model_id`.

    threads: torch threads of the engine thread (None: leave torch's setting).
    max_seqs: sequences generated together (KV-cache rows); max_queue: requests allowed to wait
    for a row (beyond it: 429); context: tokens per sequence, prompt plus answer.
    prefix_cache: reuse a prompt prefix that is still in the KV cache from an earlier request.
    stream_interval: seconds between hand-overs of generated tokens to the event loop (0: every
    step); a stream then gets its tokens in bursts, one write each (see Scheduler).
    shields: Llama Guard and Prompt Guard checks of requests and answers (serve/shields.py: a
    guard that is another model gets an engine and scheduler of its own, as many rows).
    """
    context = min(context, llm.args.max_seq_len)

    def start(app: FastAPI) -> list[Worker]:
        metrics = Metrics()
        loop = asyncio.get_running_loop()
        engine = Engine(llm.runner, llm.tokenizer, rows=max_seqs, max_len=context,
                        prefix_cache=prefix_cache)
        scheduler = Scheduler(engine, loop, max_queue, metrics.report,
                              threads=threads, stream_interval=stream_interval)

        def guard_scheduler(shield: LlamaGuardShield) -> Scheduler:
            guard = shield.guard.llm
            engine = Engine(guard.runner, guard.tokenizer, rows=max_seqs,
                            max_len=shield.context(context), prefix_cache=prefix_cache)
            return Scheduler(engine, loop, max_queue, threads=threads)

        workers: list[Worker] = [scheduler]
        if shields is not None:
            workers += shields.start(llm, scheduler, metrics, loop, guard_scheduler, threads)
        guidance = Guidance(llm.tokenizer, llm.args.vocab_size)
        app.state.server = ServerState(llm, model_id, context, scheduler, guidance, metrics,
                                       TokenText(llm.tokenizer), llm.chat_format, created=now(),
                                       shields=shields)
        return workers

    app = FastAPI(title="llamaherd", lifespan=_lifespan(start), docs_url=None, redoc_url=None)
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(ExpectJobs)  # before the body is read
    app.add_middleware(CountRequests)  # outermost: counts the 413s too
    return app


class Worker(Protocol):
    """A thread of the server's (a scheduler, a classifier's queue), started and stopped with it."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _lifespan(start: Callable[[FastAPI], list[Worker]]
              ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Build the server's state when the app starts (`start`) and stop its threads at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        workers = start(app)
        # What exists now (the model's modules, the tokenizer's tables, the libraries' objects)
        # lives as long as the server: frozen, it is left out of Python's full collections, which
        # would otherwise walk it all, holding up every stream meanwhile.
        gc.collect()
        gc.freeze()
        for worker in workers:
            worker.start()
        try:
            yield
        finally:
            for worker in workers:
                worker.stop()

    return lifespan
