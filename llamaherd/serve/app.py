"""The FastAPI app: OpenAI-compatible endpoints, tokenizer helpers, health, metrics and the web page."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaherd.engine.guidance import Guidance
from llamaherd.engine.scheduler import Scheduler
from llamaherd.generation.engine import Engine
from llamaherd.serve.chat_api import ChatRun
from llamaherd.serve.completions_api import CompletionRun
from llamaherd.serve.errors import APIError, install_handlers
from llamaherd.serve.metrics import CONTENT_TYPE, Metrics
from llamaherd.serve.openai_format import TokenText, now
from llamaherd.serve.prompting import chat_prompt_ids
from llamaherd.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from llamaherd.serve.state import ANNOUNCED, ServerState
from llamaherd.tokenizer import chat_format

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BodyLimit:
    """Reads the whole request body up front and answers 413 past `limit` bytes, whether or not
    the client sent a Content-Length; the app then sees the buffered body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= self.limit:
                chunks.append(message.get("body", b""))
            elif size > 16 * self.limit:  # stop reading; the connection is closed
                break
            if not message.get("more_body", False):
                break
        if size > self.limit:  # read (and dropped) to the end, so the client sees the answer
            await self._too_large(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect when the client leaves

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(APIError(f"the request body is larger than {self.limit} bytes", 413,
                                   code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """Counts API requests by endpoint and status code in the server's metrics."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize",
                 "/detokenize")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/v1/", "/tokenize", "/detokenize")):
            await self.app(scope, receive, send)
            return
        endpoint = next((e for e in self.ENDPOINTS if path.startswith(e)), "other")

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state = scope["app"].state.server
                state.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class ExpectJobs:
    """Announces each generation request to the scheduler as soon as it arrives, before its body
    is read and checked, so that an idle engine can wait for a burst of them (Scheduler.expect);
    one that ends without a job is counted off here."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope.get("path") not in self.PATHS):
            await self.app(scope, receive, send)
            return
        scheduler = scope["app"].state.server.scheduler
        announced = [False]
        token = ANNOUNCED.set(announced)
        scheduler.expect()
        try:
            await self.app(scope, receive, send)
        finally:
            ANNOUNCED.reset(token)
            if not announced[0]:
                scheduler.expect(-1)


def create_app(llm: Any, model_id: str, *, max_seqs: int = 8, max_queue: int = 64,
               context: int = 2048, max_body: int = 4 << 20,
               threads: int | None = None, prefix_cache: bool = True,
               stream_interval: float = 0.0) -> FastAPI:
    """An app serving `llm` (a llamaherd.api.LLM) as `model_id`.

    threads: torch threads of the engine thread (None: leave torch's setting).
    max_seqs: sequences generated together (KV-cache rows); max_queue: requests allowed to wait
    for a row (beyond it: 429); context: tokens per sequence, prompt plus answer.
    prefix_cache: reuse a prompt prefix that is still in the KV cache from an earlier request.
    stream_interval: seconds between hand-overs of generated tokens to the event loop (0: every
    step); a stream then gets its tokens in bursts, one write each (see Scheduler).
    """
    context = min(context, llm.args.max_seq_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        engine = Engine(llm.model, llm.tokenizer, rows=max_seqs, max_len=context,
                        prefix_cache=prefix_cache)
        scheduler = Scheduler(engine, asyncio.get_running_loop(), max_queue, metrics.report,
                              threads=threads, stream_interval=stream_interval)
        guidance = Guidance(llm.tokenizer, llm.args.vocab_size)
        app.state.server = ServerState(llm, model_id, context, scheduler, guidance, metrics,
                                       TokenText(llm.tokenizer), chat_format(llm.tokenizer),
                                       created=now())
        # What exists now (the model's modules, the tokenizer's tables, the libraries' objects)
        # lives as long as the server: frozen, it is left out of Python's full collections, which
        # walked it all (40-65 ms each here, holding up every stream meanwhile).
        gc.collect()
        gc.freeze()
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="llamaherd", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)

    def server(request: Request) -> ServerState:
        return request.app.state.server

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        s = server(request)
        return {"status": "ok", "model": s.model_id, "queue_depth": s.scheduler.queue_depth}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(server(request).metrics.render(), media_type=CONTENT_TYPE)

    def model_card(s: ServerState) -> dict[str, Any]:
        return {"id": s.model_id, "object": "model", "created": s.created,
                "owned_by": "llamaherd", "max_model_len": s.context}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(server(request))]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        s = server(request)
        s.check_model(model)
        return model_card(s)

    async def respond(run: ChatRun | CompletionRun, stream: bool, request: Request) -> Any:
        if stream:
            return StreamingResponse(await run.stream(), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return JSONResponse(await run.complete(request))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await respond(ChatRun(server(request), body), bool(body.stream), request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await respond(CompletionRun(server(request), body), bool(body.stream), request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        s = server(request)
        if body.model is not None:
            s.check_model(body.model)
        if body.messages is not None:
            chat_req = ChatCompletionRequest.model_validate(
                {"model": s.model_id, "messages": [m.model_dump() for m in body.messages]})
            ids = chat_prompt_ids(s.chat, chat_req)
        else:
            bos = body.add_special_tokens and bool(getattr(s.tokenizer, "add_bos", False))
            ids = s.tokenizer.encode(body.prompt or "", bos=bos)
        return {"tokens": ids, "count": len(ids), "max_model_len": s.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        s = server(request)
        if body.model is not None:
            s.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < s.tokenizer.vocab_size]
        if bad:
            raise APIError(f"tokens: id {bad[0]} is outside the vocabulary "
                           f"(0..{s.tokenizer.vocab_size - 1})", param="tokens")
        return {"prompt": s.tokenizer.decode(body.tokens)}

    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(ExpectJobs)  # before the body is read
    app.add_middleware(CountRequests)  # outermost: counts the 413s too
    return app
