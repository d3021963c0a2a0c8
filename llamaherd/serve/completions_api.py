"""POST /v1/completions: plain-text prompts (or token ids), n choices each, whole or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from llamaherd.engine.scheduler import Job
from llamaherd.generation.sampling import TokenLogprob
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import (
    completion_logprobs,
    new_id,
    now,
    sse,
    text_completion,
    usage,
)
from llamaherd.serve.prompting import completion_prompt_ids, output_budget, sampling_params
from llamaherd.serve.schemas import CompletionRequest
from llamaherd.serve.state import ServerState, ends_on_stop_token, next_event, watch_disconnect


class CompletionRun:
    """One text-completion request: a job per prompt, all reporting to one event queue."""

    def __init__(self, state: ServerState, req: CompletionRequest) -> None:
        state.check_model(req.model)
        prompts = req.prompts()
        if len(prompts) * req.n > state.scheduler.max_seqs * 4:
            raise APIError(f"{len(prompts)} prompts x n={req.n} is more than this server "
                           f"accepts in one request", param="prompt")
        if req.n > state.scheduler.max_seqs:
            raise APIError(f"n is {req.n} but the server runs at most "
                           f"{state.scheduler.max_seqs} sequences", param="n")
        self.state, self.req = state, req
        events: asyncio.Queue[Event | Exception] = asyncio.Queue()
        self.jobs: list[Job] = []
        for p in prompts:
            ids = completion_prompt_ids(state.tokenizer, p, state.vocab)
            budget = output_budget(len(ids), req.max_tokens, state.context)
            params = sampling_params(req, budget, req.logprobs, state.vocab)
            params.n = req.n
            self.jobs.append(Job(ids, [params], events=events))
        self.events = events
        self.total = len(prompts) * req.n
        self._index: dict[int, int] = {}
        self.logprobs: dict[int, list[TokenLogprob]] = {}
        self.text: dict[int, list[str]] = {}
        self.finished: dict[int, Event] = {}
        self.id, self.created = new_id("cmpl"), now()

    def _submit(self) -> None:
        try:
            for job in self.jobs:
                self.state.submit(job)
        except APIError:
            self._cancel()
            raise

    def _cancel(self) -> None:
        for job in self.jobs:
            self.state.scheduler.cancel(job)

    def _index_of(self, event: Event) -> int:
        idx = self._index.get(event.seq.id)
        if idx is None:
            for j, job in enumerate(self.jobs):
                ids = [s.id for s in job.seqs]
                if event.seq.id in ids:
                    idx = j * self.req.n + ids.index(event.seq.id)
            self._index[event.seq.id] = idx  # type: ignore[assignment]
        return idx  # type: ignore[return-value]

    async def _next(self) -> tuple[int, Event]:
        event = await next_event(self.jobs[0])  # every job shares the one queue
        i = self._index_of(event)
        if event.logprob is not None and not ends_on_stop_token(event):
            self.logprobs.setdefault(i, []).append(event.logprob)
        self.text.setdefault(i, []).append(event.text)
        if event.finish_reason is not None:
            self.finished[i] = event
        return i, event

    def _usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, prompt tokens found in the cache)."""
        prompt = sum(len(j.prompt_ids) for j in self.jobs)
        cached = sum(j.seqs[0].cached_tokens for j in self.jobs if j.seqs)
        return prompt, sum(len(e.seq.output_ids) for e in self.finished.values()), cached

    def _done(self) -> None:
        for job in self.jobs:
            job.done = True
            self.state.metrics.finished(job.submitted, job.first_token, self._usage()[1])

    async def complete(self, request: Request) -> dict[str, Any]:
        self._submit()
        watcher = watch_disconnect(request, self.state, self.jobs)
        try:
            while len(self.finished) < self.total:
                await self._next()
            for job in self.jobs:
                job.done = True
        finally:
            watcher.cancel()
            self._cancel()
        self._done()
        choices = []
        for i in range(self.total):
            lp = None
            if self.req.logprobs is not None:
                lp = completion_logprobs(self.state.token_text, self.logprobs.get(i, []))
            choices.append({"text": "".join(self.text.get(i, [])), "index": i, "logprobs": lp,
                            "finish_reason": self.finished[i].finish_reason})
        prompt, out, cached = self._usage()
        return text_completion(self.req.model, choices, prompt, out, self.id, self.created,
                               cached_tokens=cached)

    async def stream(self) -> AsyncIterator[bytes]:
        self._submit()
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        offsets: dict[int, int] = {}
        ready: list[bytes] = []  # the chunks of the events queued so far: one write
        try:
            while len(self.finished) < self.total:
                if ready and self.events.empty():
                    yield b"".join(ready)
                    ready.clear()
                try:
                    i, event = await self._next()
                except APIError as e:
                    yield b"".join(ready) + sse(e.body())
                    return
                lp = None
                if event.logprob is not None and not ends_on_stop_token(event):
                    lp = completion_logprobs(self.state.token_text, [event.logprob],
                                             offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + len(event.text)
                if not event.text and lp is None and event.finish_reason is None:
                    continue
                choice = {"text": event.text, "index": i, "logprobs": lp,
                          "finish_reason": event.finish_reason}
                obj = text_completion(self.req.model, [choice], 0, 0, self.id, self.created,
                                      with_usage=False)
                if self.req.include_usage():
                    obj["usage"] = None
                ready.append(sse(obj))
            for job in self.jobs:
                job.done = True
            self._done()
            if self.req.include_usage():
                obj = text_completion(self.req.model, [], 0, 0, self.id, self.created,
                                      with_usage=False)
                obj["usage"] = usage(*self._usage())
                ready.append(sse(obj))
            yield b"".join(ready) + b"data: [DONE]\n\n"
        finally:
            self._cancel()
