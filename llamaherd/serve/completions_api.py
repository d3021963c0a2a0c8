"""POST /v1/completions: plain-text prompts (or token ids), n choices each, whole or streamed."""

from __future__ import annotations

import asyncio
from typing import Any

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
from llamaherd.serve.run import Choice, Run
from llamaherd.serve.scheduler import Job
from llamaherd.serve.schemas import CompletionRequest
from llamaherd.serve.state import ServerState, ends_on_stop_token


class CompletionRun(Run):
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
        self.req = req
        events: asyncio.Queue[Event | Exception] = asyncio.Queue()
        jobs, texts = [], []
        for p in prompts:
            ids = completion_prompt_ids(state.tokenizer, p, state.vocab)
            if state.shields is not None:  # token ids are judged as their text
                texts.append(p if isinstance(p, str) else state.tokenizer.decode(ids))
            budget = output_budget(len(ids), req.max_tokens, state.context)
            params = sampling_params(req, budget, req.logprobs, state.vocab)
            params.n = req.n
            jobs.append(Job(ids, [params], events=events))
        # the shields judge each prompt as a user message; one flagged refuses the request
        conversations = [[{"role": "user", "content": t}] for t in texts]
        super().__init__(state, jobs, req.n, conversations=conversations or None)
        self.id, self.created = new_id("cmpl"), now()

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            if c.violation is not None:  # a shield's refusal instead of the answer
                choices.append({"text": c.violation.user_message, "index": c.index,
                                "logprobs": None, "finish_reason": "content_filter",
                                "safety_violation": c.violation.to_dict()})
                continue
            lp = None
            if self.req.logprobs is not None:
                lp = completion_logprobs(self.state.token_text, c.logprobs)
            choices.append({"text": "".join(c.text), "index": c.index, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        prompt, out, cached = self.usage()
        return text_completion(self.req.model, choices, prompt, out, self.id, self.created,
                               cached_tokens=cached)

    def deltas(self, c: Choice, event: Event) -> list[bytes]:
        lp = None
        if event.logprob is not None and not ends_on_stop_token(event):
            lp = completion_logprobs(self.state.token_text, [event.logprob], c.chars)
        if not event.text and lp is None and event.finish_reason is None:
            return []
        choice = {"text": event.text, "index": c.index, "logprobs": lp,
                  "finish_reason": event.finish_reason}
        obj = text_completion(self.req.model, [choice], 0, 0, self.id, self.created,
                              with_usage=False)
        if self.req.include_usage():
            obj["usage"] = None
        return [sse(obj)]

    def refusal(self, c: Choice) -> list[bytes]:
        v = c.violation
        assert v is not None
        choice = {"text": v.user_message, "index": c.index, "logprobs": None,
                  "finish_reason": "content_filter", "safety_violation": v.to_dict()}
        obj = text_completion(self.req.model, [choice], 0, 0, self.id, self.created,
                              with_usage=False)
        if self.req.include_usage():
            obj["usage"] = None
        return [sse(obj)]

    def closing(self) -> list[bytes]:
        if not self.req.include_usage():
            return []
        obj = text_completion(self.req.model, [], 0, 0, self.id, self.created, with_usage=False)
        obj["usage"] = usage(*self.usage())
        return [sse(obj)]
