"""One generation request as engine jobs, collected whole or streamed: what chat and text
completions share (the Run base class; chat_api.py and completions_api.py fill in the shapes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from llamaherd.generation.sampling import TokenLogprob
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import sse
from llamaherd.serve.scheduler import Job
from llamaherd.serve.state import ServerState, ends_on_stop_token, next_event, watch_disconnect


@dataclass
class Choice:
    """One choice's output as it arrives."""

    index: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    chars: int = 0  # characters of text before the newest piece
    finish_reason: str | None = None
    event: Event | None = None  # the last event (its .seq has the full output)


class Run:
    """A validated request turned into engine jobs (one per prompt, `n` choices each) that all
    report to one event queue: choice j * n + k is the k-th sequence of job j.

    Subclasses give the response shapes: `response` (the whole answer), and for a stream
    `opening` (chunks before any token), `deltas` (the chunks of one event) and `closing`.
    """

    def __init__(self, state: ServerState, jobs: list[Job], n: int,
                 choices: list[Choice] | None = None) -> None:
        self.state, self.jobs, self.n = state, jobs, n
        self.choices = choices or [Choice(i) for i in range(len(jobs) * n)]
        self._index: dict[int, int] = {}  # sequence id -> choice index

    # ---- the jobs -------------------------------------------------------------------------------
    def submit(self) -> None:
        """Queue every job; if one is refused (a full queue) the others are cancelled."""
        try:
            for job in self.jobs:
                self.state.submit(job)
        except APIError:
            self.cancel()
            raise

    def cancel(self) -> None:
        for job in self.jobs:
            self.state.scheduler.cancel(job)

    def _choice(self, event: Event) -> Choice:
        idx = self._index.get(event.seq.id)
        if idx is None:
            for j, job in enumerate(self.jobs):
                ids = [s.id for s in job.seqs]
                if event.seq.id in ids:
                    idx = self._index[event.seq.id] = j * self.n + ids.index(event.seq.id)
        return self.choices[idx]  # type: ignore[index]

    async def next(self) -> tuple[Choice, Event]:
        """The next event of any job, recorded in its choice."""
        event = await next_event(self.jobs[0])  # every job shares the one queue
        c = self._choice(event)
        if event.logprob is not None and not ends_on_stop_token(event):
            c.logprobs.append(event.logprob)
        c.chars += sum(len(t) for t in c.text[-1:])
        c.text.append(event.text)
        if event.finish_reason is not None:
            c.finish_reason = event.finish_reason
            c.event = event
        return c, event

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, prompt tokens found in the cache)."""
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        out = sum(len(c.event.seq.output_ids) for c in self.choices if c.event is not None)
        cached = sum(job.seqs[0].cached_tokens for job in self.jobs if job.seqs)
        return prompt, out, cached

    def _finished(self) -> None:
        for job in self.jobs:
            job.done = True
            out = sum(len(s.output_ids) for s in job.seqs)
            self.state.metrics.finished(job.submitted, job.first_token, out)

    # ---- whole response -------------------------------------------------------------------------
    async def complete(self, request: Request) -> dict[str, Any]:
        """Run every choice to its end (cancelled if the client leaves) and answer at once."""
        self.submit()
        watcher = watch_disconnect(request, self.state, self.jobs)
        try:
            pending = len(self.choices)
            while pending:
                _, event = await self.next()
                pending -= event.finish_reason is not None
            for job in self.jobs:
                job.done = True
        finally:
            watcher.cancel()
            self.cancel()
        self._finished()
        return self.response()

    def response(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- streamed response ----------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[bytes]:
        """SSE chunks; the jobs are submitted before the first chunk, so a full queue is a 429."""
        self.submit()
        return self._sse()

    async def _sse(self) -> AsyncIterator[bytes]:
        ready = self.opening()  # chunks not written yet: the events queued so far go in one write
        try:
            pending = len(self.choices)
            while pending:
                if ready and self.jobs[0].events.empty():
                    yield b"".join(ready)
                    ready = []
                try:
                    c, event = await self.next()
                except APIError as e:
                    yield b"".join(ready) + sse(e.body())
                    return
                ready += self.deltas(c, event)
                pending -= event.finish_reason is not None
            self._finished()
            yield b"".join(ready + self.closing()) + b"data: [DONE]\n\n"
        finally:
            self.cancel()

    def opening(self) -> list[bytes]:
        return []

    def deltas(self, c: Choice, event: Event) -> list[bytes]:
        raise NotImplementedError

    def closing(self) -> list[bytes]:
        return []
