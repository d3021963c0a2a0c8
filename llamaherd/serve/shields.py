"""The server's shields: Llama Guard and Prompt Guard checks run beside generation, and their
verdicts as Llama Stack's safety violations.

Where a check runs. A Llama Guard check is one more generation job (the guard's classification
request, a short greedy answer) handed to a Scheduler like any request, so concurrent checks (the
input shields of a burst of requests, the output checks of every running answer, a
/v1/moderations list) are prefilled and decoded together in the same batched engine steps.

- The guard is the served model itself: its checks go to the served model's Scheduler and share
  its engine, cache rows and prefix cache (the guard prompt's long common header is prefilled
  once and then found in the cache).
- The guard is another model: it gets an Engine of its own, driven by a second Scheduler (the
  same class, the same loop, a thread of its own, given the same torch thread count). The two
  models' steps never wait for each other: a decode step of the served model does not stall
  behind a guard's prefill. (One thread stepping both engines in turn was the alternative; it
  would make every served token wait for the guard's steps.)

A Prompt Guard classifier does not generate: ClassifierQueue runs it on a thread of its own,
each batch taking every text submitted while the previous one ran.

A request's shield checks take part in the burst announcements of serve/middleware.py: the
first job a request submits counts its announcement off (claim_announcement), whichever the
scheduler; a check on a guard's own scheduler (or Prompt Guard's thread) tells the served
model's scheduler at once (expect(-1)), so that it does not wait for a request still being
judged.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaherd.generation.generate import Completion
from llamaherd.safety.categories import LLAMA_GUARD_REFUSAL, PROMPT_GUARD_REFUSAL, openai_categories
from llamaherd.safety.llama_guard import Conversation, GuardAnswerError, LlamaGuard, Verdict
from llamaherd.serve.errors import APIError, QueueFullError
from llamaherd.serve.metrics import Metrics
from llamaherd.serve.middleware import claim_announcement
from llamaherd.serve.scheduler import Job, JobCancelled, QueueFull, Scheduler

if TYPE_CHECKING:
    from llamaherd.api import LLM
    from llamaherd.safety.prompt_guard import PromptGuard, PromptVerdict

DEFAULT_EVERY = 32  # answer tokens between two output-shield checks
Message = dict[str, Any]  # {"role", "content"}


@dataclass
class Violation:
    """A shield's flag, as Llama Stack reports it (SafetyViolation) with llamaherd's details."""

    shield_id: str
    stage: str  # input, output, moderation, run_shield
    user_message: str  # the canned refusal the client gets instead of an answer
    violation_type: str  # Llama Guard: "S1,S10"; Prompt Guard: "prompt_injection:jailbreak"
    categories: list[str]  # Llama Guard codes, or the Prompt Guard label
    score: float  # P(unsafe) of Llama Guard's first token; Prompt Guard's injection score
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"violation_level": "error", "user_message": self.user_message,
                "metadata": {"violation_type": self.violation_type, "shield_id": self.shield_id,
                             "stage": self.stage, "categories": self.categories,
                             "score": self.score, **self.details}}


def shield_id(name_or_path: str) -> str:
    """The identifier of a shield loaded from a registered name (the name) or a path (its
    file or directory name without suffix)."""
    looks_like_path = "/" in name_or_path or name_or_path.endswith(".gguf") or \
        Path(name_or_path).exists()
    return Path(name_or_path).stem if looks_like_path else name_or_path


class Shield:
    """A configured shield: its Llama Stack resource (`card`) and how it judges a
    conversation's last message (`violation`)."""

    provider_id = ""

    def __init__(self, identifier: str, model: str) -> None:
        self.identifier, self.model = identifier, model
        self.stages: list[str] = []  # where the server applies it: input, output
        self.metrics: Metrics | None = None

    def card(self) -> dict[str, Any]:
        """Llama Stack's Shield object."""
        return {"identifier": self.identifier, "provider_id": self.provider_id,
                "provider_resource_id": self.model, "type": "shield",
                "params": {"stages": list(self.stages), **self.params()}}

    def params(self) -> dict[str, Any]:
        return {}

    async def violation(self, conversation: list[Message], stage: str) -> Violation | None:
        raise NotImplementedError

    def _count(self, stage: str, flagged: list[list[str] | None]) -> None:
        """Count checks in the metrics, and the flags among them: one list of categories per
        check, None where it passed."""
        if self.metrics is None:
            return
        self.metrics.shield_checks.labels(self.identifier, stage).inc(len(flagged))
        for categories in flagged:
            if categories is None:
                continue
            for category in categories or ["unspecified"]:
                self.metrics.shield_flagged.labels(self.identifier, stage, category).inc()


class LlamaGuardShield(Shield):
    """Llama Guard over a loaded model, its checks run as jobs on a Scheduler."""

    provider_id = "llama-guard"

    def __init__(self, identifier: str, model: str, guard: LlamaGuard) -> None:
        super().__init__(identifier, model)
        self.guard = guard
        self.scheduler: Scheduler | None = None
        self.served: Scheduler | None = None  # the served model's scheduler

    def params(self) -> dict[str, Any]:
        return {"categories": list(self.guard.categories),
                "excluded_categories": list(self.guard.excluded)}

    def context(self, answer_context: int) -> int:
        """Tokens per sequence of a guard engine of its own: a conversation of `answer_context`
        tokens inside the classification request, and the guard's answer (at most the guard's
        window)."""
        overhead = len(self.guard.prompt("x")) + self.guard.max_new_tokens
        return min(self.guard.llm.args.max_seq_len, answer_context + overhead)

    def attach(self, scheduler: Scheduler, served: Scheduler, metrics: Metrics) -> None:
        self.scheduler, self.served, self.metrics = scheduler, served, metrics

    async def verdicts(self, conversations: Sequence[Conversation], stage: str) -> list[Verdict]:
        """Verdicts on the conversations' last messages, their jobs submitted together; bad
        input is an APIError (400), a guard answering neither safe nor unsafe a 500."""
        assert self.scheduler is not None and self.served is not None, "shield not attached"
        requests = []
        for conversation in conversations:
            try:
                requests.append((self.guard.prompt(conversation), self.guard.params()))
            except ValueError as e:
                raise APIError(f"shield {self.identifier!r}: {e}", param="messages") from e
        jobs = [Job(ids, [params]) for ids, params in requests]
        try:
            for job in jobs:
                self._submit(job)
            done = [await self._answer(job) for job in jobs]  # all run meanwhile
        except BaseException:
            for job in jobs:
                self.scheduler.cancel(job)
            raise
        out = []
        for completion, (_, params) in zip(done, requests):
            try:
                out.append(self.guard.verdict(completion, params))
            except GuardAnswerError as e:
                raise APIError(f"shield {self.identifier!r} failed: {e}", 500,
                               type="server_error") from e
        self._count(stage, [None if v.safe else v.categories for v in out])
        return out

    def _submit(self, job: Job) -> None:
        first = claim_announcement()
        shared = self.scheduler is self.served
        try:
            self.scheduler.submit(job, expected=first and shared)  # type: ignore[union-attr]
        except QueueFull as e:
            raise QueueFullError(self.scheduler.max_queue) from e  # type: ignore[union-attr]
        finally:
            if first and not shared:
                self.served.expect(-1)  # type: ignore[union-attr]

    async def _answer(self, job: Job) -> Completion:
        """The guard's finished answer to one job."""
        while True:
            item = await job.events.get()
            if isinstance(item, JobCancelled):
                raise APIError("the client closed the request", 499,
                               code="client_closed_request")
            if isinstance(item, ValueError):  # the request does not fit the guard's window
                raise APIError(f"shield {self.identifier!r} cannot judge this: {item}",
                               param="messages")
            if isinstance(item, Exception):
                raise APIError(f"shield {self.identifier!r} failed: {item}", 500,
                               type="server_error")
            if item.finish_reason is not None:
                job.done = True
                return Completion.from_sequence(item.seq, None)

    async def violation(self, conversation: list[Message], stage: str) -> Violation | None:
        verdict = (await self.verdicts([conversation], stage))[0]
        return None if verdict.safe else self.as_violation(verdict, stage)

    def as_violation(self, verdict: Verdict, stage: str) -> Violation:
        return Violation(self.identifier, stage, LLAMA_GUARD_REFUSAL,
                         ",".join(verdict.categories), list(verdict.categories), verdict.score,
                         {"openai_categories": openai_categories(verdict.categories)})


class ClassifierQueue:
    """A Prompt Guard classifier on a thread of its own: texts submitted while a batch runs wait
    and are scored together in the next one."""

    def __init__(self, guard: PromptGuard, loop: asyncio.AbstractEventLoop,
                 threads: int | None = None) -> None:
        self.guard, self.loop, self.threads = guard, loop, threads
        self._cv = threading.Condition()
        self._waiting: deque[tuple[list[str], asyncio.Future[list[PromptVerdict]]]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llamaherd-prompt-guard",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    async def check_many(self, texts: list[str]) -> list[PromptVerdict]:
        future: asyncio.Future[list[PromptVerdict]] = self.loop.create_future()
        with self._cv:
            self._waiting.append((texts, future))
            self._cv.notify()
        return await future

    def _run(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not (self._stopping or self._waiting):
                    self._cv.wait()
                if self._stopping:
                    return
                batch, self._waiting = list(self._waiting), deque()
            texts = [t for texts, _ in batch for t in texts]
            try:
                verdicts = self.guard.check_many(texts)
            except Exception as e:  # noqa: BLE001 -- a failed batch fails its requests only
                traceback.print_exc()
                for _, future in batch:
                    self.loop.call_soon_threadsafe(_settle, future, None, e)
                continue
            start = 0
            for texts, future in batch:
                part = verdicts[start:start + len(texts)]
                start += len(texts)
                self.loop.call_soon_threadsafe(_settle, future, part, None)


def _settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.done():  # its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class PromptGuardShield(Shield):
    """Prompt Guard over a loaded classifier: jailbreaks and prompt injections in the last
    message (as Llama Stack's shield checks it)."""

    provider_id = "prompt-guard"

    def __init__(self, identifier: str, model: str, guard: PromptGuard) -> None:
        super().__init__(identifier, model)
        self.guard = guard
        self.queue: ClassifierQueue | None = None
        self.served: Scheduler | None = None  # the served model's scheduler

    def params(self) -> dict[str, Any]:
        return {"jailbreak_threshold": self.guard.jailbreak_threshold,
                "injection_threshold": self.guard.injection_threshold}

    async def verdicts(self, texts: list[str], stage: str) -> list[PromptVerdict]:
        assert self.queue is not None, "shield not attached"
        if claim_announcement() and self.served is not None:
            self.served.expect(-1)  # the request is being judged here, not generated yet
        try:
            verdicts = await self.queue.check_many(texts)
        except ValueError as e:
            raise APIError(f"shield {self.identifier!r}: {e}", param="messages") from e
        except Exception as e:
            raise APIError(f"shield {self.identifier!r} failed: {e}", 500,
                           type="server_error") from e
        self._count(stage, [[v.label] if v.flagged else None for v in verdicts])
        return verdicts

    async def violation(self, conversation: list[Message], stage: str) -> Violation | None:
        text = str(conversation[-1].get("content") or "") if conversation else ""
        if not text.strip():  # nothing that could carry an injection
            return None
        verdict = (await self.verdicts([text], stage))[0]
        return None if not verdict.flagged else self.as_violation(verdict, stage)

    def as_violation(self, verdict: PromptVerdict, stage: str) -> Violation:
        return Violation(self.identifier, stage, PROMPT_GUARD_REFUSAL,
                         f"prompt_injection:{verdict.label}", [verdict.label],
                         verdict.injection_score,
                         {"jailbreak_score": verdict.jailbreak_score,
                          "injection_score": verdict.injection_score})


def last_user_turn(conversation: list[Message]) -> list[Message] | None:
    """The conversation up to its last user message (what an input shield judges), or None
    when it has none."""
    for i in range(len(conversation) - 1, -1, -1):
        if conversation[i].get("role") == "user":
            return conversation[:i + 1]
    return None


@dataclass
class Shields:
    """The shields a server applies: Llama Guard on the input and the output (the same one or
    two), Prompt Guard on the input; `every`: answer tokens between output checks."""

    input: LlamaGuardShield | None = None
    output: LlamaGuardShield | None = None
    prompt: PromptGuardShield | None = None
    every: int = DEFAULT_EVERY

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"the output shield's interval must be >= 1 token, not {self.every}")
        for stage, shield in (("input", self.input), ("output", self.output),
                              ("input", self.prompt)):
            if shield is not None and stage not in shield.stages:
                shield.stages.append(stage)
        ids = [s.identifier for s in self.all()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"two different shields are both named {ids[0]!r}: load one "
                             "of them from a path with another name")

    def all(self) -> list[Shield]:
        """Each configured shield once."""
        out: list[Shield] = []
        for shield in (self.input, self.output, self.prompt):
            if shield is not None and all(shield is not s for s in out):
                out.append(shield)
        return out

    def get(self, identifier: str, param: str = "shield_id") -> Shield:
        """The shield of that identifier (or model name), else a 404 naming the ones there are."""
        for shield in self.all():
            if identifier in (shield.identifier, shield.model):
                return shield
        known = ", ".join(repr(s.identifier) for s in self.all()) or "none"
        raise APIError(f"the shield {identifier!r} does not exist; this server has {known}",
                       404, param=param, code="shield_not_found")

    def start(self, llm: LLM, served: Scheduler, metrics: Metrics, loop: asyncio.AbstractEventLoop,
              own_scheduler: Callable[[LlamaGuardShield], Scheduler],
              threads: int | None) -> list[Scheduler | ClassifierQueue]:
        """Attach every shield to where its checks run (see above); returns the schedulers and
        queues of their own, for the caller to start and stop."""
        workers: list[Scheduler | ClassifierQueue] = []
        by_model: dict[int, Scheduler] = {id(llm): served}
        for shield in self.all():
            if isinstance(shield, LlamaGuardShield):
                key = id(shield.guard.llm)
                if key not in by_model:
                    by_model[key] = own_scheduler(shield)
                    workers.append(by_model[key])
                shield.attach(by_model[key], served, metrics)
            elif isinstance(shield, PromptGuardShield):
                shield.queue = ClassifierQueue(shield.guard, loop, threads)
                shield.served, shield.metrics = served, metrics
                workers.append(shield.queue)
        return workers

    async def check_input(self, conversation: list[Message]) -> Violation | None:
        """The first violation of the input shields (Llama Guard, then Prompt Guard) on the
        conversation's last user message; both run at once."""
        turn = last_user_turn(conversation)
        if turn is None:
            return None
        checks = [s.violation(turn, "input") for s in (self.input, self.prompt) if s is not None]
        for violation in await asyncio.gather(*checks):
            if violation is not None:
                return violation
        return None


def load_shields(input: str | None, output: str | None, prompt: str | None, served: str,
                 served_llm: LLM, every: int = DEFAULT_EVERY, dtype: str | None = None,
                 quant: str | None = None) -> Shields | None:
    """The shields named on the command line, each model loaded once (a guard named like the
    served model is the served model); None when none is named."""
    if input is None and output is None and prompt is None:
        return None
    from llamaherd.api import load

    guards: dict[str, LlamaGuardShield] = {}

    def llama_guard(name: str | None) -> LlamaGuardShield | None:
        if name is None:
            return None
        if name not in guards:
            llm = served_llm if name == served else load(name, dtype=dtype, quant=quant)
            guards[name] = LlamaGuardShield(shield_id(name), name, LlamaGuard(llm))
        return guards[name]

    prompt_shield = None
    if prompt is not None:
        from llamaherd.safety.prompt_guard import load_prompt_guard

        prompt_shield = PromptGuardShield(shield_id(prompt), prompt, load_prompt_guard(prompt))
    return Shields(llama_guard(input), llama_guard(output), prompt_shield, every)
