"""The continuous-batching scheduler driving the real default model, without HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from llamaherd.api import load
from llamaherd.generation.engine import Engine
from llamaherd.generation.sampling import SamplingParams
from llamaherd.hub import DEFAULT_MODEL
from llamaherd.serve.scheduler import Job, JobCancelled, QueueFull, Scheduler, ScoreJob


@pytest.fixture(scope="module")
def llm():
    return load(DEFAULT_MODEL, dtype="float32")


def params(**kw: object) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 6, "temperature": 0.0, **kw})  # type: ignore[arg-type]


async def drain(job: Job) -> list[str]:
    """Texts of the job's sequences once every one has finished."""
    done: dict[int, str] = {}
    texts: dict[int, list[str]] = {}
    while len(done) < job.rows:
        item = await job.events.get()
        if isinstance(item, Exception):
            raise item
        texts.setdefault(item.seq.id, []).append(item.text)
        if item.finish_reason is not None:
            done[item.seq.id] = "".join(texts[item.seq.id])
    return [done[s.id] for s in job.seqs]


def counting_scheduler(llm, rows: int) -> tuple[Scheduler, list[int]]:
    """A started Scheduler (in the running event loop) over a new engine, and the list where each
    engine step records how many prompts were waiting in the engine when it began."""
    engine = Engine(llm.runner, llm.tokenizer, rows=rows, max_len=128)
    waiting: list[int] = []
    step = engine.step

    def counting_step():
        waiting.append(len(engine._waiting))
        return step()

    engine.step = counting_step  # type: ignore[method-assign]
    sched = Scheduler(engine, asyncio.get_running_loop())
    sched.start()
    return sched, waiting


def test_jobs_join_a_running_batch_and_match_running_alone(llm) -> None:
    prompts = [llm.tokenizer.encode(p) for p in ("The capital of France is", "One, two,",
                                                 "def main():", "Once upon a time")]

    async def run(concurrent: bool) -> list[list[str]]:
        engine = Engine(llm.runner, llm.tokenizer, rows=2, max_len=128)
        sched = Scheduler(engine, asyncio.get_running_loop(), max_queue=8)
        sched.start()
        try:
            if not concurrent:
                return [await drain(sched.submit(Job(p, [params()]))) for p in prompts]
            jobs = [sched.submit(Job(p, [params(max_new_tokens=6 + i)]))
                    for i, p in enumerate(prompts)]  # 4 jobs, 2 rows: two wait
            return list(await asyncio.gather(*(drain(j) for j in jobs)))
        finally:
            sched.stop()

    alone = asyncio.run(run(False))
    together = asyncio.run(run(True))
    for a, t in zip(alone, together):  # greedy: a longer budget only extends the text
        assert t[0].startswith(a[0])
    assert "Paris" in together[0][0]


def test_cancel_frees_rows_and_a_full_queue_refuses(llm) -> None:
    async def run() -> None:
        engine = Engine(llm.runner, llm.tokenizer, rows=1, max_len=256)
        sched = Scheduler(engine, asyncio.get_running_loop(), max_queue=1)
        sched.start()
        try:
            prompt = llm.tokenizer.encode("Tell me a story")
            long = sched.submit(Job(prompt, [params(max_new_tokens=200, ignore_eos=True)]))
            first = await long.events.get()
            assert not isinstance(first, Exception)
            waiting = sched.submit(Job(prompt, [params()]))
            with pytest.raises(QueueFull):
                sched.submit(Job(prompt, [params()]))
            sched.cancel(waiting)  # a waiting job leaves the queue at once
            assert isinstance(await waiting.events.get(), JobCancelled)
            sched.cancel(long)  # a running one leaves the batch and frees its row
            while not isinstance(await long.events.get(), JobCancelled):
                pass
            after = sched.submit(Job(prompt, [replace(params(), n=1)]))
            assert (await drain(after))[0]
            assert engine.free_rows == 1 and engine.idle
        finally:
            sched.stop()

    asyncio.run(run())


def test_a_stream_interval_hands_tokens_over_in_bursts_first_token_at_once(llm) -> None:
    """With a stream interval the event loop is woken once per interval, not once per token;
    the first token is not held back, and every event still arrives, in order."""
    prompt = llm.tokenizer.encode("Tell me a story")
    budget = params(max_new_tokens=40, ignore_eos=True)

    async def run(interval: float) -> tuple[list[int], list[int], float]:
        engine = Engine(llm.runner, llm.tokenizer, rows=1, max_len=128)
        sched = Scheduler(engine, asyncio.get_running_loop(), stream_interval=interval)
        sched.start()
        try:
            job = sched.submit(Job(prompt, [budget]))
            tokens: list[int] = []
            bursts: list[int] = []  # events per hand-over
            start, finished = asyncio.get_running_loop().time(), False
            while not finished:
                if job.events.empty() or not bursts:
                    bursts.append(0)  # nothing queued: this get waits for a new hand-over
                item = await job.events.get()
                assert not isinstance(item, Exception)
                bursts[-1] += 1
                tokens.append(item.token_id)
                finished = item.finish_reason is not None
            return tokens, bursts, asyncio.get_running_loop().time() - start
        finally:
            sched.stop()

    every_step, steps, _ = asyncio.run(run(0.0))
    held, bursts, seconds = asyncio.run(run(0.25))
    assert held == every_step and len(held) == 40
    assert bursts[0] == 1  # the first token is handed over alone, at once
    assert len(bursts) <= 2 + seconds / 0.25  # then at most one hand-over per interval
    assert len(bursts) < len(steps)


def test_an_idle_engine_waits_for_announced_requests_and_prefills_them_together(llm) -> None:
    """Requests announced with expect() (the server does it as each arrives) hold an idle engine
    back until they are submitted, so a burst's prompts go through one prefill; without an
    announcement a job starts alone, and an announced request that never submits holds the
    engine at most BURST_WAIT."""
    import llamaherd.serve.scheduler as scheduler_module

    prompts = [llm.tokenizer.encode(p) for p in ("The capital of France is", "One, two,")]

    async def run(announced: int, submitted: int) -> tuple[int, float]:
        """(prompts in the first engine step, seconds to the first job's first token)"""
        sched, first_step = counting_scheduler(llm, rows=2)
        try:
            loop = asyncio.get_running_loop()
            sched.expect(announced)
            start = loop.time()
            jobs = [sched.submit(Job(prompts[0], [params()]), expected=announced > 0)]
            await asyncio.sleep(0.005)  # the second request is still being read
            if submitted == 2:
                jobs.append(sched.submit(Job(prompts[1], [params()]), expected=announced > 1))
            await jobs[0].events.get()
            seconds = loop.time() - start
            for job in jobs:
                await drain(job)
            sched.expect(submitted - announced)  # a request that ended without a job
            return first_step[0], seconds
        finally:
            sched.stop()

    assert asyncio.run(run(announced=2, submitted=2))[0] == 2  # one prefill for both
    assert asyncio.run(run(announced=0, submitted=2))[0] == 1  # unannounced: the first alone
    prompts_first, seconds = asyncio.run(run(announced=2, submitted=1))
    assert prompts_first == 1 and scheduler_module.BURST_WAIT <= seconds < 2.0


def test_a_burst_still_arriving_is_prefilled_together(llm, monkeypatch) -> None:
    """Several jobs waiting at once (a burst) hold an idle engine until no request has come for
    ARRIVAL_GAP, even with none announced: the late ones join the same prefill; a lone job does
    not wait for the gap."""
    import llamaherd.serve.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP", 0.05)  # wide, for a loaded machine
    prompts = [llm.tokenizer.encode(p) for p in ("The capital of France is", "One, two,", "Hi")]

    async def run(first: int) -> int:
        """Prompts in the first engine step, with `first` jobs submitted at once and the rest
        10 ms later."""
        sched, first_step = counting_scheduler(llm, rows=3)
        try:
            jobs = [sched.submit(Job(p, [params()])) for p in prompts[:first]]
            await asyncio.sleep(0.01)
            jobs += [sched.submit(Job(p, [params()])) for p in prompts[first:]]
            for job in jobs:
                await drain(job)
            return first_step[0]
        finally:
            sched.stop()

    assert asyncio.run(run(first=2)) == 3  # two at once: a burst, which the third joins
    # a lone job starts at once: waiting for the gap, it would have taken the other two along
    assert asyncio.run(run(first=1)) == 1


def test_score_jobs_waiting_together_are_scored_in_one_pass_and_fail_alone(llm) -> None:
    prompts = [llm.tokenizer.encode(p) for p in ("The capital of France is", "One, two,",
                                                 "def main():")]

    async def run() -> tuple[list[int], list[object]]:
        loop = asyncio.get_running_loop()
        engine = Engine(llm.runner, llm.tokenizer, rows=2, max_len=128)
        calls: list[int] = []  # prompts per Engine.score call
        score = engine.score

        def counting_score(batch: list[list[int]], top: int = 0) -> list:
            calls.append(len(batch))
            return score(batch, top)

        engine.score = counting_score  # type: ignore[method-assign]
        sched = Scheduler(engine, loop)
        jobs = [ScoreJob([p], 1, loop.create_future()) for p in prompts]
        jobs.append(ScoreJob([[]], 1, loop.create_future()))  # an empty prompt: fails alone
        gone = ScoreJob([prompts[0]], 1, loop.create_future())
        gone.result.cancel()  # its client left before it ran: skipped
        for job in [*jobs, gone]:
            sched.score(job)
        sched.start()  # every job is waiting when the engine thread first looks
        try:
            return calls, await asyncio.gather(*(j.result for j in jobs),
                                               return_exceptions=True)
        finally:
            sched.stop()

    calls, results = asyncio.run(run())
    assert calls == [4, 1, 1, 1, 1]  # together; then, one prompt being bad, each job alone
    *scored, failed = results
    assert isinstance(failed, ValueError) and "empty" in str(failed)
    alone = Engine(llm.runner, llm.tokenizer, rows=1, max_len=128).score(prompts, 1)
    for [entries], expected in zip(scored, alone):  # type: ignore[misc]
        assert entries[0] is None and len(entries) == len(expected)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(entries[1:], expected[1:])) < 1e-4
