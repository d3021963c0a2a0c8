"""The FastAPI app: the server's state built at startup, its routes and its middleware."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from llamaherd.generation.constraints import Guidance
from llamaherd.generation.engine import Engine
from llamaherd.serve.errors import install_handlers
from llamaherd.serve.metrics import Metrics
from llamaherd.serve.middleware import BodyLimit, CountRequests, ExpectJobs
from llamaherd.serve.openai_format import TokenText, now
from llamaherd.serve.routes import router
from llamaherd.serve.scheduler import Scheduler
from llamaherd.serve.state import ServerState

if TYPE_CHECKING:
    from llamaherd.api import LLM


def create_app(llm: LLM, model_id: str, *, max_seqs: int = 8, max_queue: int = 64,
               context: int = 2048, max_body: int = 4 << 20,
               threads: int | None = None, prefix_cache: bool = True,
               stream_interval: float = 0.0) -> FastAPI:
    """An app serving `llm` as `model_id`.

    threads: torch threads of the engine thread (None: leave torch's setting).
    max_seqs: sequences generated together (KV-cache rows); max_queue: requests allowed to wait
    for a row (beyond it: 429); context: tokens per sequence, prompt plus answer.
    prefix_cache: reuse a prompt prefix that is still in the KV cache from an earlier request.
    stream_interval: seconds between hand-overs of generated tokens to the event loop (0: every
    step); a stream then gets its tokens in bursts, one write each (see Scheduler).
    """
    context = min(context, llm.args.max_seq_len)

    def start(app: FastAPI) -> Scheduler:
        metrics = Metrics()
        engine = Engine(llm.runner, llm.tokenizer, rows=max_seqs, max_len=context,
                        prefix_cache=prefix_cache)
        scheduler = Scheduler(engine, asyncio.get_running_loop(), max_queue, metrics.report,
                              threads=threads, stream_interval=stream_interval)
        guidance = Guidance(llm.tokenizer, llm.args.vocab_size)
        app.state.server = ServerState(llm, model_id, context, scheduler, guidance, metrics,
                                       TokenText(llm.tokenizer), llm.chat_format, created=now())
        return scheduler

    app = FastAPI(title="llamaherd", lifespan=_lifespan(start), docs_url=None, redoc_url=None)
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(ExpectJobs)  # before the body is read
    app.add_middleware(CountRequests)  # outermost: counts the 413s too
    return app


def _lifespan(start: Callable[[FastAPI], Scheduler]
              ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Build the server's state when the app starts (`start`) and stop its scheduler at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler = start(app)
        # What exists now (the model's modules, the tokenizer's tables, the libraries' objects)
        # lives as long as the server: frozen, it is left out of Python's full collections, which
        # would otherwise walk it all, holding up every stream meanwhile.
        gc.collect()
        gc.freeze()
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    return lifespan
