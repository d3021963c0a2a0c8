"""What every endpoint shares: the model, its scheduler, grammar compiler, metrics, limits and
shields."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from llamaherd.chat import ChatFormat
from llamaherd.generation.constraints import Guidance
from llamaherd.generation.scoring import PromptLogprobs
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError, QueueFullError
from llamaherd.serve.metrics import Metrics
from llamaherd.serve.middleware import claim_announcement
from llamaherd.serve.openai_format import TokenText
from llamaherd.serve.scheduler import (
    EngineFailure,
    Job,
    JobCancelled,
    QueueFull,
    Scheduler,
    ScoreJob,
)
from llamaherd.serve.shields import Shields
from llamaherd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llamaherd.api import LLM


@dataclass
class ServerState:
    llm: LLM
    model_id: str
    context: int  # tokens per sequence (prompt + output)
    scheduler: Scheduler
    guidance: Guidance
    metrics: Metrics
    token_text: TokenText
    chat: ChatFormat
    created: int = 0
    shields: Shields | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.tokenizer

    @property
    def vocab(self) -> int:
        return self.llm.args.vocab_size

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(f"the model {name!r} does not exist; this server serves "
                           f"{self.model_id!r}", 404, param="model", code="model_not_found")

    def submit(self, job: Job) -> Job:
        """Queue a job with the scheduler, counting off its request's announcement (see
        serve/middleware.py); a full queue is a 429."""
        try:
            self.scheduler.submit(job, expected=claim_announcement())
        except QueueFull as e:
            raise QueueFullError(self.scheduler.max_queue) from e
        except ValueError as e:
            raise APIError(f"n: {e}", param="n") from e
        self.metrics.prompt_tokens.inc(len(job.prompt_ids) * max(1, len(job.choices)))
        return job


    def score(self, prompts: list[list[int]], top: int) -> ScoreJob:
        """Queue the scoring of prompts (Scheduler.score), counting off the request's
        announcement as submit does; await it with `scored`."""
        job = ScoreJob(prompts, top, asyncio.get_running_loop().create_future())
        try:
            self.scheduler.score(job, expected=claim_announcement())
        except QueueFull as e:
            raise QueueFullError(self.scheduler.max_queue) from e
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return job

    async def scored(self, job: ScoreJob) -> list[PromptLogprobs]:
        """A score job's result; its failure as an APIError (bad input: 400, else 500)."""
        try:
            return await job.result
        except ValueError as e:
            raise APIError(f"prompt: {e}", param="prompt") from e
        except EngineFailure as e:
            raise APIError(f"scoring failed: {e}", 500, type="server_error") from e


def ends_on_stop_token(event: Event) -> bool:
    """Whether the event is a stop token, which (as in OpenAI's API) gets no logprob entry."""
    return event.finish_reason == "stop" and isinstance(event.seq.stop_reason, int)


def as_event(job: Job, item: Any) -> Event:
    """An item of the job's event queue as an Event; an engine-side failure (or a shield's)
    becomes an APIError."""
    if isinstance(item, APIError):
        job.done = True
        raise item
    if isinstance(item, Exception):
        job.done = True
        if isinstance(item, JobCancelled):
            raise APIError("the client closed the request", 499, code="client_closed_request")
        if isinstance(item, ValueError):
            raise APIError(str(item))
        raise APIError(f"generation failed: {item}", 500, type="server_error")
    return item


def watch_disconnect(request: Request, state: ServerState, jobs: list[Job]) -> asyncio.Task[Any]:
    """Cancel `jobs` when the client of a non-streaming request goes away."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for job in jobs:
                    state.scheduler.cancel(job)
                return

    task = asyncio.get_running_loop().create_task(watch())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return task
