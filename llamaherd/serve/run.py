"""One generation request as engine jobs, collected whole or streamed: what chat and text
completions share (the Run base class; chat_api.py and completions_api.py fill in the shapes),
shields included: the input shields judge the request before any job starts, the output shield
the answers as they are made (serve/output_shield.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from llamaherd.generation.sampling import TokenLogprob
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import sse
from llamaherd.serve.output_shield import Checked, OutputWatch
from llamaherd.serve.scheduler import Job
from llamaherd.serve.shields import Message, Violation
from llamaherd.serve.state import ServerState, as_event, ends_on_stop_token, watch_disconnect


@dataclass
class Choice:
    """One choice's output as it arrives."""

    index: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    chars: int = 0  # characters of text before the newest piece
    finish_reason: str | None = None
    event: Event | None = None  # the last event (its .seq has the full output)
    violation: Violation | None = None  # a shield's, when one stopped this choice


class Run:
    """A validated request turned into engine jobs (one per prompt, `n` choices each) that all
    report to one event queue: choice j * n + k is the k-th sequence of job j.

    Subclasses give the response shapes: `response` (the whole answer), and for a stream
    `opening` (chunks before any token), `deltas` (the chunks of one event), `refusal` (the
    chunks of a choice a shield stopped) and `closing`; and may do work of their own beside the
    jobs: started in `submit`, awaited in `ready` (before any event is read), stopped in
    `cancel`. `conversations`: each job's prompt as messages, for the shields. A run may have no
    jobs at all (a text completion that only scores its prompts): its choices are then complete
    once `ready` returns.
    """

    # whether a stop token that ends a choice keeps its logprob entry (it has none in OpenAI's
    # chat API; an echoed completion keeps one entry per token, see completions_api.py)
    keep_stop_logprobs = False

    def __init__(self, state: ServerState, jobs: list[Job], n: int,
                 choices: list[Choice] | None = None,
                 conversations: list[list[Message]] | None = None) -> None:
        self.state, self.jobs, self.n = state, jobs, n
        self.choices = choices or [Choice(i) for i in range(len(jobs) * n)]
        self.conversations = conversations  # one per job
        self.refused: Violation | None = None  # the input shields' verdict
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

    async def ready(self) -> None:
        """Wait for the work a subclass started in `submit` beside the jobs (nothing here)."""

    def _choice(self, event: Event) -> Choice:
        idx = self._index.get(event.seq.id)
        if idx is None:
            for j, job in enumerate(self.jobs):
                ids = [s.id for s in job.seqs]
                if event.seq.id in ids:
                    idx = self._index[event.seq.id] = j * self.n + ids.index(event.seq.id)
        return self.choices[idx]  # type: ignore[index]

    # ---- shields --------------------------------------------------------------------------------
    async def screen(self) -> bool:
        """Run the input shields; True if they refuse the request (every choice then ends with
        the refusal, and no job is submitted)."""
        shields = self.state.shields
        if shields is None or self.conversations is None:
            return False
        verdicts = await asyncio.gather(*(shields.check_input(c) for c in self.conversations))
        self.refused = next((v for v in verdicts if v is not None), None)
        if self.refused is None:
            return False
        for c in self.choices:
            c.violation, c.finish_reason = self.refused, "content_filter"
        return True

    def headers(self) -> dict[str, str]:
        """Response headers naming the input shields' violation, if any."""
        if self.refused is None:
            return {}
        return {"x-llamaherd-shield": self.refused.shield_id,
                "x-llamaherd-violation": self.refused.violation_type}

    def _watch(self) -> OutputWatch | None:
        shields = self.state.shields
        if (shields is None or shields.output is None or self.conversations is None
                or not self.jobs):
            return None
        conversations = self.conversations
        return OutputWatch(shields.output, lambda c: conversations[c.index // self.n],
                           shields.every, self.jobs[0].events, self.state.scheduler)

    # ---- the events -----------------------------------------------------------------------------
    async def released(self) -> AsyncIterator[tuple[Choice, Event | None]]:
        """Every choice's events as they may reach the client, recorded in their choices: at
        once, or with an output shield once it has judged the answer up to them. A choice the
        shield stops ends with (choice, None), its violation set."""
        watch = self._watch()
        pending = len(self.choices) if self.jobs else 0
        try:
            while pending:
                item = await self.jobs[0].events.get()  # every job shares the one queue
                if isinstance(item, Checked):
                    out = watch.checked(item)  # type: ignore[union-attr]
                else:
                    event = as_event(self.jobs[0], item)
                    c = self._choice(event)
                    if watch is not None:
                        watch.receive(c, event)
                        continue
                    out = [(c, event)]
                for c, e in out:
                    if e is not None:
                        self._record(c, e)
                    pending -= e is None or e.finish_reason is not None
                    yield c, e
        finally:
            if watch is not None:
                watch.close()

    def has_logprob(self, event: Event) -> bool:
        """Whether the event's token gets a logprob entry (see keep_stop_logprobs)."""
        return event.logprob is not None and (self.keep_stop_logprobs
                                               or not ends_on_stop_token(event))

    def _record(self, c: Choice, event: Event) -> None:
        if self.has_logprob(event):
            c.logprobs.append(event.logprob)
        c.chars += sum(len(t) for t in c.text[-1:])
        c.text.append(event.text)
        if event.finish_reason is not None:
            c.finish_reason = event.finish_reason
            c.event = event

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
        if await self.screen():
            return self.response()
        self.submit()
        watcher = watch_disconnect(request, self.state, self.jobs)
        events = self.released()
        try:
            await self.ready()
            async for _ in events:
                pass
            for job in self.jobs:
                job.done = True
        finally:
            await events.aclose()
            watcher.cancel()
            self.cancel()
        self._finished()
        return self.response()

    def response(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- streamed response ----------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[bytes]:
        """SSE chunks; the input shields run and the jobs are submitted before the first chunk,
        so a full queue is a 429."""
        if await self.screen():
            return self._refusal_sse()
        self.submit()
        return self._sse()

    async def _refusal_sse(self) -> AsyncIterator[bytes]:
        chunks = self.opening() + [b for c in self.choices for b in self.refusal(c)]
        yield b"".join(chunks + self.closing()) + b"data: [DONE]\n\n"

    async def _sse(self) -> AsyncIterator[bytes]:
        events = self.released()
        try:
            try:
                await self.ready()
            except APIError as e:
                yield sse(e.body())
                return
            ready = self.opening()  # chunks not written yet: the events queued so far go in
            while True:  # one write
                if ready and (not self.jobs or self.jobs[0].events.empty()):
                    yield b"".join(ready)
                    ready = []
                try:
                    c, event = await anext(events)
                except StopAsyncIteration:
                    break
                except APIError as e:
                    yield b"".join(ready) + sse(e.body())
                    return
                ready += self.refusal(c) if event is None else self.deltas(c, event)
            self._finished()
            yield b"".join(ready + self.closing()) + b"data: [DONE]\n\n"
        finally:
            await events.aclose()
            self.cancel()

    def opening(self) -> list[bytes]:
        return []

    def deltas(self, c: Choice, event: Event) -> list[bytes]:
        raise NotImplementedError

    def refusal(self, c: Choice) -> list[bytes]:
        """The chunks ending a choice a shield stopped: its refusal, finish_reason
        "content_filter" and the violation."""
        raise NotImplementedError

    def closing(self) -> list[bytes]:
        return []
