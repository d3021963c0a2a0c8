"""POST /v1/completions: plain-text prompts (or token ids), n choices each, whole or streamed;
with `echo`, each choice starts with its prompt and, with `logprobs`, the prompt tokens'
log-probabilities (a ScoreJob on the scheduler, serve/scheduler.py), as lm-evaluation-harness's
`local-completions` model asks for them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from llamaherd.generation.scoring import PromptLogprobs
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import (
    completion_logprobs,
    echo_logprobs,
    join_logprobs,
    new_id,
    now,
    sse,
    text_completion,
    usage,
)
from llamaherd.serve.prompting import completion_prompt_ids, output_budget, sampling_params
from llamaherd.serve.run import Choice, Run
from llamaherd.serve.scheduler import Job, ScoreJob
from llamaherd.serve.schemas import CompletionRequest
from llamaherd.serve.state import ServerState


@dataclass
class Echo:
    """One prompt as a choice's text starts with it: the text (a text prompt as sent, token ids
    decoded), and its logprobs object once scored."""

    text: str
    ids: list[int]
    skip: int  # leading tokens not in the text (a BOS added to a text prompt)
    logprobs: dict[str, Any] | None = None


class CompletionRun(Run):
    """One text-completion request: a job per prompt, all reporting to one event queue (none when
    max_tokens is 0: the prompts are only scored).

    With echo and logprobs, each choice's logprobs hold one entry per token, prompt and answer:
    the prompt's from a score job run beside the generation jobs, then the answer's, a stop token
    that ends it included (clients such as lm-evaluation-harness read the entries by position:
    with max_tokens 1 they drop the last one as the generated token).
    """

    def __init__(self, state: ServerState, req: CompletionRequest) -> None:
        state.check_model(req.model)
        prompts = req.prompts()
        generate = req.max_tokens != 0
        if generate and len(prompts) * req.n > state.scheduler.max_seqs * 4:
            raise APIError(f"prompt: {len(prompts)} prompts x n={req.n} is more than this "
                           f"server accepts in one request", param="prompt")
        if generate and req.n > state.scheduler.max_seqs:
            raise APIError(f"n: {req.n} but the server runs at most "
                           f"{state.scheduler.max_seqs} sequences", param="n")
        self.req = req
        events: asyncio.Queue[Event | Exception] = asyncio.Queue()
        jobs, texts, self.echoes = [], [], []
        for p in prompts:
            ids = completion_prompt_ids(state.tokenizer, p, state.vocab)
            if state.shields is not None:  # token ids are judged as their text
                texts.append(p if isinstance(p, str) else state.tokenizer.decode(ids))
            if req.echo:  # encode_prompt puts a BOS first where the model expects one
                text = p if isinstance(p, str) else state.tokenizer.decode(ids)
                skip = int(isinstance(p, str) and state.tokenizer.add_bos)
                self.echoes.append(Echo(text, ids, skip))
            if not generate:
                if len(ids) > state.context:
                    raise APIError(f"prompt: the prompt has {len(ids)} tokens but the context "
                                   f"window is {state.context} tokens", param="prompt",
                                   code="context_length_exceeded")
                continue
            budget = output_budget(len(ids), req.max_tokens, state.context, param="prompt")
            params = sampling_params(req, budget, req.logprobs, state.vocab)
            params.n = req.n
            jobs.append(Job(ids, [params], events=events))
        choices = [Choice(i) for i in range(len(prompts) * req.n)]
        if not generate:
            for c in choices:
                c.finish_reason = "length"
        # the shields judge each prompt as a user message; one flagged refuses the request
        conversations = [[{"role": "user", "content": t}] for t in texts]
        super().__init__(state, jobs, req.n, choices, conversations=conversations or None)
        self.keep_stop_logprobs = req.echo
        self.score_job: ScoreJob | None = None
        self.id, self.created = new_id("cmpl"), now()

    # ---- scoring the echoed prompts -------------------------------------------------------------
    def submit(self) -> None:
        if self.req.echo and self.req.logprobs is not None:
            self.score_job = self.state.score([e.ids for e in self.echoes], self.req.logprobs)
        super().submit()

    async def ready(self) -> None:
        if self.score_job is None:
            return
        scores: list[PromptLogprobs] = await self.state.scored(self.score_job)
        for e, entries in zip(self.echoes, scores):
            e.logprobs = echo_logprobs(self.state.token_text, e.ids, entries, e.skip)

    def cancel(self) -> None:
        if self.score_job is not None:
            self.state.scheduler.cancel_score(self.score_job)
            self.score_job.result.cancel()
        super().cancel()

    def usage(self) -> tuple[int, int, int]:
        prompt, out, cached = super().usage()
        if not self.jobs:  # only scored: each prompt once
            prompt = sum(len(e.ids) for e in self.echoes)
        return prompt, out, cached

    def _echo(self, c: Choice) -> Echo | None:
        return self.echoes[c.index // self.n] if self.req.echo else None

    def _logprobs(self, c: Choice) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        echo = self._echo(c)
        answer = completion_logprobs(self.state.token_text, c.logprobs,
                                     len(echo.text) if echo else 0)
        if echo is None or echo.logprobs is None:
            return answer
        return join_logprobs(echo.logprobs, answer)

    # ---- whole response -------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            if c.violation is not None:  # a shield's refusal instead of the answer
                choices.append({"text": c.violation.user_message, "index": c.index,
                                "logprobs": None, "finish_reason": "content_filter",
                                "safety_violation": c.violation.to_dict()})
                continue
            echo = self._echo(c)
            choices.append({"text": (echo.text if echo else "") + "".join(c.text),
                            "index": c.index, "logprobs": self._logprobs(c),
                            "finish_reason": c.finish_reason})
        prompt, out, cached = self.usage()
        return text_completion(self.req.model, choices, prompt, out, self.id, self.created,
                               cached_tokens=cached)

    # ---- streamed response ----------------------------------------------------------------------
    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj = text_completion(self.req.model, [choice], 0, 0, self.id, self.created,
                              with_usage=False)
        if self.req.include_usage():
            obj["usage"] = None
        return sse(obj)

    def opening(self) -> list[bytes]:
        """With echo, each choice's first chunk is its prompt (and its logprobs); with max_tokens
        0 that is also its last."""
        if not self.req.echo or self.refused is not None:
            return []
        chunks = []
        for c in self.choices:
            echo = self._echo(c)
            assert echo is not None
            chunks.append(self._chunk({"text": echo.text, "index": c.index,
                                       "logprobs": echo.logprobs,
                                       "finish_reason": None if self.jobs else "length"}))
        return chunks

    def deltas(self, c: Choice, event: Event) -> list[bytes]:
        lp = None
        if self.has_logprob(event):
            echo = self._echo(c)
            lp = completion_logprobs(self.state.token_text, [event.logprob],  # type: ignore[list-item]
                                     c.chars + (len(echo.text) if echo else 0))
        if not event.text and lp is None and event.finish_reason is None:
            return []
        return [self._chunk({"text": event.text, "index": c.index, "logprobs": lp,
                             "finish_reason": event.finish_reason})]

    def refusal(self, c: Choice) -> list[bytes]:
        v = c.violation
        assert v is not None
        return [self._chunk({"text": v.user_message, "index": c.index, "logprobs": None,
                             "finish_reason": "content_filter", "safety_violation": v.to_dict()})]

    def closing(self) -> list[bytes]:
        if not self.req.include_usage():
            return []
        obj = text_completion(self.req.model, [], 0, 0, self.id, self.created, with_usage=False)
        obj["usage"] = usage(*self.usage())
        return [sse(obj)]
