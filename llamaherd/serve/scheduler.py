"""Continuous batching: one thread runs the engine's step loop; asyncio callers submit and cancel.

Requests wait in a bounded queue until the engine has free cache rows for all their choices, join
the batch between two steps, and leave it as soon as they finish or are cancelled. Every step's
events are handed to the event loop in one call, so the per-token cost on the serving side is one
queue put per sequence. With a stream interval, steps' events are held and handed over together at
most once per interval: a busy server then wakes its event loop, and writes to each client, once
per interval instead of once per token (a job's first token, errors, cancellations and the last
events before the engine idles are handed over at once).

An idle engine waits briefly for a burst of requests so that their prompts are prefilled in one
pass: the protocol (announcements by the server's middleware, counted off at submit, the waits
here) is described in one place, llamaherd/serve/middleware.py. A client sends a burst's
requests one after another, so the count of announced requests can touch zero in the middle of
one: when several jobs are already waiting, the engine also waits until no request has arrived
for ARRIVAL_GAP.

Prompt scoring (a text completion's `echo` with `logprobs`) is a ScoreJob: the engine thread runs
every waiting one between two steps, all their prompts in one call of Engine.score (forward
passes without the KV cache, prompts packed side by side; generation/scoring.py), so the
running sequences pause for about one prefill and their cache rows are left untouched. Scoring
could instead have been part of the engine's prefill (logits of every prompt position); but
then no prompt prefix could come from the cache, and every prefill path (the fused step, the
chunked one, prompts riding in a decode step) would have to keep them. Score jobs take part in
the burst waits as generation jobs do, so that the prompts of requests arriving together are
scored in one pass.

A shield's guard model, when it is not the served model, is driven by a Scheduler of its own (its
own engine and thread; see serve/shields.py); an output shield stops one sequence of a request
with stop_sequence.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llamaherd.generation.engine import Engine
from llamaherd.generation.sampling import SamplingParams
from llamaherd.generation.scoring import PromptLogprobs
from llamaherd.generation.sequence import Event, Sequence

BURST_WAIT = 0.02  # seconds an idle engine waits for announced requests at most
ARRIVAL_GAP = 0.002  # seconds without a new request that end a burst


class QueueFull(Exception):
    """More requests are waiting than the scheduler accepts."""


class EngineFailure(Exception):
    """The engine raised while this request was running; it was cancelled."""


class JobCancelled(Exception):
    """The last item of a cancelled job's event queue, so nothing waits on it forever."""


@dataclass
class Job:
    """One request: a prompt and one SamplingParams per choice (or one with n for a shared prefill).

    Its events arrive on `events` (an asyncio.Queue) in the caller's event loop: Event objects, or
    an EngineFailure/ValueError instance if the request could not run, or JobCancelled.
    """

    prompt_ids: list[int]
    choices: list[SamplingParams]
    events: asyncio.Queue[Event | Exception] = field(default_factory=asyncio.Queue)
    seqs: list[Sequence] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    done: bool = False
    started: bool = False  # an event of it was handed over (engine thread)

    @property
    def rows(self) -> int:
        return len(self.choices) if len(self.choices) > 1 else self.choices[0].n


@dataclass
class ScoreJob:
    """Prompts whose every token's log-probability is wanted, with the `top` most likely tokens
    at each position (Engine.score). `result` (a future of the caller's event loop) gets one
    PromptLogprobs per prompt, or the exception that stopped them (a ValueError: bad input)."""

    prompts: list[list[int]]
    top: int
    result: asyncio.Future[list[PromptLogprobs]]


class Scheduler:
    """Owns an Engine and the thread that steps it."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, max_queue: int = 64,
                 report: Callable[[int, int, int, int], None] | None = None,
                 threads: int | None = None, stream_interval: float = 0.0) -> None:
        self.engine = engine
        # torch threads for the engine thread. The caller should keep its own thread at 1: two
        # threads each leading a team of OpenMP workers oversubscribe the cores, and the
        # workers then stop spinning between parallel regions, halving decode speed.
        self.threads = threads
        self.loop = loop
        self.stream_interval = stream_interval  # seconds (see above)
        self._held: list[tuple[Job, Event | Exception]] = []
        self._last_post = 0.0
        self.max_seqs = engine.rows
        self.max_queue = max_queue
        # report(running sequences, waiting jobs, tokens generated, prompt tokens found in the
        # cache): after every step and every change of the queue (may be called from either thread)
        self.report = report
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._scoring: list[ScoreJob] = []
        self._cancelled: list[Job] = []
        self._stopped: list[Sequence] = []  # single sequences to stop (see stop_sequence)
        self._owner: dict[int, Job] = {}  # sequence id -> job
        self._expected = 0  # requests announced by expect() and not submitted yet
        self._last_arrival = 0.0  # perf_counter of the last expect() or submit()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llamaherd-engine", daemon=True)

    # ---- the caller's side (event loop thread) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def expect(self, requests: int = 1) -> None:
        """Announce requests that are being read and will submit a job (or call expect(-1) if
        they end without one): an idle engine waits for them before it starts a prefill."""
        with self._cv:
            self._expected += requests
            if requests > 0:
                self._last_arrival = time.perf_counter()
            self._cv.notify()

    def submit(self, job: Job, expected: bool = False) -> Job:
        """Queue a job (expected: its request was announced by expect()); raises QueueFull when
        `max_queue` jobs are already waiting."""
        with self._cv:
            if expected:  # here now, whether or not it is queued
                self._expected -= 1
                self._cv.notify()
            if job.rows > self.max_seqs:
                raise ValueError(f"{job.rows} choices exceed the server's {self.max_seqs} "
                                 "sequences")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.append(job)
            self._last_arrival = time.perf_counter()
            self._cv.notify()
        self._report(0)
        return job

    def score(self, job: ScoreJob, expected: bool = False) -> ScoreJob:
        """Queue a score job (expected: as for submit); raises QueueFull when `max_queue` score
        jobs are already waiting."""
        with self._cv:
            if expected:
                self._expected -= 1
            if len(self._scoring) >= self.max_queue:
                self._cv.notify()
                raise QueueFull(self.max_queue)
            self._scoring.append(job)
            self._last_arrival = time.perf_counter()
            self._cv.notify()
        return job

    def cancel_score(self, job: ScoreJob) -> None:
        """Drop a score job not started yet (its client left); one already running finishes."""
        with self._cv:
            if job in self._scoring:
                self._scoring.remove(job)

    def cancel(self, job: Job) -> None:
        """Stop a job (client gone): its sequences leave the batch and free their rows."""
        with self._cv:
            if job.done:
                return
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
                job.events.put_nowait(JobCancelled())
                self._report(0)
                return
            self._cancelled.append(job)
            self._cv.notify()

    def stop_sequence(self, seq: Sequence) -> None:
        """Stop one sequence of a job (an output shield flagged its answer) while the job's
        others go on: its row is freed and its last event, finish_reason "cancelled", is handed
        over as usual (unless it finished first)."""
        with self._cv:
            self._stopped.append(seq)
            self._cv.notify()

    def _report(self, tokens: int, cached: int = 0) -> None:
        if self.report is not None:
            with self._cv:  # one report at a time, so the last one written is the latest state
                self.report(len(self._owner), len(self._waiting), tokens, cached)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancelled or self._stopped
                           or self._scoring or not self.engine.idle):
                    self._cv.wait()
                starting = self.engine.idle and bool(self._waiting or self._scoring)
            if starting:
                self._catch_up()
            with self._cv:
                if starting:
                    self._await_burst()
                if self._stopping:
                    return
                cancelled, self._cancelled = self._cancelled, []
                stopped, self._stopped = self._stopped, []
                scoring, self._scoring = self._scoring, []
                admitted = self._admit()
            if scoring:
                self._score(scoring)
            for job in cancelled:
                self._drop(job)
                self._post([(job, JobCancelled())])
            self._stop(stopped)
            cached = sum(self._add(job) for job in admitted)
            if cancelled or stopped or admitted:
                self._report(0, cached)
            if self.engine.idle:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 -- a failed step fails its jobs, not the server
                traceback.print_exc()
                self._fail_running(e)
                continue
            self._deliver(events)

    def _catch_up(self) -> None:
        """Let the event loop run two rounds of its callbacks (requests it has read start, and
        announce themselves), at most BURST_WAIT seconds."""
        done = threading.Event()
        try:
            self.loop.call_soon_threadsafe(lambda: self.loop.call_soon(done.set))
        except RuntimeError:  # the loop is closed: shutting down
            return
        done.wait(BURST_WAIT)

    def _await_burst(self) -> None:
        """Wait (under the lock) while announced requests are on their way, or (several jobs
        waiting: a burst) until none came for ARRIVAL_GAP, while more would fit; at most
        BURST_WAIT seconds."""
        deadline = time.perf_counter() + BURST_WAIT
        while (not self._stopping and not self._cancelled
               and sum(j.rows for j in self._waiting) < self.engine.free_rows):
            now = time.perf_counter()
            quiet = now - self._last_arrival
            burst = len(self._waiting) > 1 and quiet < ARRIVAL_GAP
            left = deadline - now
            if (self._expected <= 0 and not burst) or left <= 0:
                return
            self._cv.wait(left if self._expected > 0 else min(left, ARRIVAL_GAP - quiet))

    def _score(self, jobs: list[ScoreJob]) -> None:
        """Run score jobs together (one Engine.score call) and hand over their results."""
        jobs = [j for j in jobs if not j.result.done()]  # a cancelled future: its client left
        if not jobs:
            return
        try:
            scores = self.engine.score([p for j in jobs for p in j.prompts],
                                       max(j.top for j in jobs))
        except Exception as e:  # noqa: BLE001 -- a failed score fails its jobs, not the server
            if isinstance(e, ValueError) and len(jobs) > 1:  # one job's bad prompt: each alone,
                for j in jobs:  # so that only that job fails
                    self._score([j])
                return
            if not isinstance(e, ValueError):
                traceback.print_exc()
            failure = e if isinstance(e, ValueError) else EngineFailure(f"{type(e).__name__}: {e}")
            self._hand_over([(j, failure) for j in jobs])
            return
        results, start = [], 0
        for j in jobs:
            mine = scores[start:start + len(j.prompts)]
            start += len(j.prompts)
            if j.top < max(x.top for x in jobs):  # scored with more alternatives than asked
                for entries in mine:
                    for e in entries:
                        if e is not None:
                            e.top = e.top[:j.top]
            results.append((j, mine))
        self._hand_over(results)

    def _hand_over(self, results: list[tuple[ScoreJob, Any]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_set_results, results)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit the free rows now, in arrival order (called under the lock)."""
        admitted: list[Job] = []
        free = self.engine.free_rows
        while self._waiting and self._waiting[0].rows <= free:
            job = self._waiting.popleft()
            free -= job.rows
            admitted.append(job)
        return admitted

    def _add(self, job: Job) -> int:
        """Hand the job to the engine; returns its prompt tokens found in the cache (counted once
        per prefill, as the prompt tokens are)."""
        try:
            if len(job.choices) == 1:
                seqs = self.engine.add_group(job.prompt_ids, job.choices[0])
                cached = seqs[0].cached_tokens  # one prefill for the whole group
            else:
                seqs = [self.engine.add(job.prompt_ids, replace(p, n=1)) for p in job.choices]
                cached = sum(s.cached_tokens for s in seqs)
        except ValueError as e:
            self._post([(job, e)])
            return 0
        job.seqs = seqs
        for s in seqs:
            self._owner[s.id] = job
        return cached

    def _stop(self, seqs: list[Sequence]) -> None:
        """Cancel single sequences still running and hand over their last events."""
        batch: list[tuple[Job, Event | Exception]] = []
        for seq in seqs:
            job = self._owner.pop(seq.id, None)
            if job is None or seq.finished:
                continue
            event = self.engine.cancel(seq)
            if event is not None:
                batch.append((job, event))
        if batch:
            self._post(batch)

    def _drop(self, job: Job) -> None:
        for s in job.seqs:
            if not s.finished:  # a finished sequence's row may already belong to another one
                self.engine.cancel(s)
            self._owner.pop(s.id, None)
        job.done = True

    def _fail_running(self, error: Exception) -> None:
        jobs = {id(j): j for j in self._owner.values()}.values()
        for job in list(jobs):
            self._drop(job)
            self._post([(job, EngineFailure(f"{type(error).__name__}: {error}"))])

    def _deliver(self, events: list[Event]) -> None:
        batch: list[tuple[Job, Event | Exception]] = []
        for e in events:
            job = self._owner.get(e.seq.id)
            if job is None:
                continue
            if e.finish_reason is not None:
                del self._owner[e.seq.id]
            batch.append((job, e))
        self._report(sum(e.token_id is not None for e in events))
        urgent = False
        for job, _ in batch:
            urgent |= not job.started
            job.started = True
        self._post(batch, urgent=urgent)

    def _post(self, batch: list[tuple[Job, Any]], urgent: bool = True) -> None:
        """Hand events to the event loop, or hold them until the stream interval has passed."""
        self._held += batch
        now = time.perf_counter()
        if self._held and (urgent or self.engine.idle
                           or now - self._last_post >= self.stream_interval):
            batch, self._held, self._last_post = self._held, [], now
            self.loop.call_soon_threadsafe(_put_all, batch)


def _set_results(results: list[tuple[ScoreJob, Any]]) -> None:
    for job, value in results:
        if job.result.done():
            continue
        if isinstance(value, Exception):
            job.result.set_exception(value)
        else:
            job.result.set_result(value)


def _put_all(batch: list[tuple[Job, Event | Exception]]) -> None:
    now = time.perf_counter()
    for job, item in batch:
        if job.first_token is None and isinstance(item, Event):
            job.first_token = now
        job.events.put_nowait(item)
