"""The server's ASGI middleware: body size limit, request counting, and burst announcements.

Burst announcements. Requests often arrive in bursts (a page load, a batch job, a benchmark),
and a burst's prompts are best prefilled in one pass. So the server tells the scheduler about
each generation request the moment it arrives, before its body is read and checked:

1. ExpectJobs (here) calls Scheduler.expect() as a POST to a generation endpoint starts, and
   marks the request in the ANNOUNCED context variable as "announced, no job yet".
2. When the request's first job is submitted, ServerState.submit (or a shield's check, see
   serve/shields.py) claims the mark (claim_announcement) and passes expected=True, which counts
   the announcement off (Scheduler.submit). A request that ends
   without a job (a 400, a 429) is counted off by ExpectJobs with expect(-1).
3. The scheduler's engine thread, idle and given a job, first lets the event loop run what it
   has already received (Scheduler._catch_up: requests read so far get to announce themselves),
   then waits while announced requests are still being read, and, when several jobs are already
   waiting, until no request has arrived for ARRIVAL_GAP; at most BURST_WAIT in all
   (Scheduler._await_burst). A lone request starts at once.
"""

from __future__ import annotations

import json
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaherd.serve.errors import APIError

# While a generation request is read and checked: [whether it has submitted a job] (step 1-2)
ANNOUNCED: ContextVar[list[bool] | None] = ContextVar("announced", default=None)


def claim_announcement() -> bool:
    """Whether this is the first job of an announced request (step 2): True once a request."""
    announced = ANNOUNCED.get()
    if announced is None or announced[0]:
        return False
    announced[0] = True
    return True


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

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/moderations",
                 "/v1/shields", "/v1/safety/run-shield", "/tokenizer_info", "/tokenize",
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
    is read and checked, so that an idle engine can wait for a burst of them (see above); one
    that ends without a job is counted off here."""

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
