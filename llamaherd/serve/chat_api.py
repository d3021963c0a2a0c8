"""POST /v1/chat/completions: one request's choices, collected whole or streamed as SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from llamaherd.engine.guidance import GrammarConstraint
from llamaherd.engine.scheduler import Job
from llamaherd.generation.sampling import TokenLogprob
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import (
    ChatChunks,
    chat_completion,
    chat_logprob_entries,
    sse,
    tool_call_dict,
)
from llamaherd.serve.prompting import (
    ToolSyntax,
    chat_grammar,
    chat_prompt_ids,
    output_budget,
    sampling_params,
    tool_syntax,
)
from llamaherd.serve.schemas import ChatCompletionRequest
from llamaherd.serve.state import ServerState, ends_on_stop_token, next_event, watch_disconnect


@dataclass
class Choice:
    """One choice's output as it arrives."""

    index: int
    constraint: GrammarConstraint | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    held: str = ""  # streamed text held back while it may be a tool call
    holding: bool = False
    finish_reason: str | None = None
    event: Event | None = None  # the last event (its .seq has the full output)


class ChatRun:
    """A validated chat request turned into one engine job."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest) -> None:
        state.check_model(req.model)
        if req.n > state.scheduler.max_seqs:
            raise APIError(f"n is {req.n} but the server runs at most "
                           f"{state.scheduler.max_seqs} sequences", param="n")
        self.state, self.req = state, req
        prompt = chat_prompt_ids(state.chat, req)
        budget = output_budget(len(prompt), req.token_limit(), state.context)
        self.syntax: ToolSyntax = tool_syntax(state.chat)
        grammar = chat_grammar(req, state.guidance, self.syntax)
        tool_choice = req.effective_tool_choice()
        self.tools_on = tool_choice != "none"
        self.tool_names = {t.function.name for t in req.tools or []}
        self.forced_tool = self.tools_on and tool_choice != "auto"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.choices = [Choice(i) for i in range(req.n)]
        if grammar is None:  # one group: the prompt is prefilled once for all n choices
            params = sampling_params(req, budget, logprobs, state.vocab)
            params.n = req.n
            choices = [params]
        else:  # every choice needs its own grammar state
            choices = []
            for i, c in enumerate(self.choices):
                c.constraint = state.guidance.constraint(grammar)
                p = sampling_params(req, budget, logprobs, state.vocab, seed_offset=i)
                p.logits_processors = [c.constraint]
                choices.append(p)
        self.job = Job(prompt, choices)
        self._index: dict[int, int] = {}

    # ---- shared ---------------------------------------------------------------------------------
    def _choice(self, event: Event) -> Choice:
        idx = self._index.get(event.seq.id)
        if idx is None:
            idx = self._index[event.seq.id] = [s.id for s in self.job.seqs].index(event.seq.id)
        return self.choices[idx]

    def _record(self, event: Event) -> Choice:
        c = self._choice(event)
        if event.logprob is not None and not ends_on_stop_token(event):
            c.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            c.finish_reason = event.finish_reason
            c.event = event
        return c

    def _check_grammar(self, c: Choice) -> None:
        if c.constraint is not None and c.constraint.error is not None:
            raise APIError(f"constrained generation failed: {c.constraint.error}", 500,
                           type="server_error")

    def _parse(self, c: Choice) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a finished choice."""
        seq = c.event.seq  # type: ignore[union-attr]
        text = "".join(c.text)
        if not self.tools_on:
            return text, []
        stop = seq.stop_reason if isinstance(seq.stop_reason, int) else None
        parsed = self.state.chat.parse(seq.output_ids, stop, self.tool_names)
        calls = [tool_call_dict(tc.id, tc.name, tc.arguments) for tc in parsed.tool_calls
                 if tc.name in self.tool_names]
        if not calls:
            return text, []
        return (parsed.content or None), calls

    def _usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, prompt tokens found in the cache)."""
        out = sum(len(c.event.seq.output_ids) for c in self.choices if c.event is not None)
        cached = self.job.seqs[0].cached_tokens if self.job.seqs else 0
        return len(self.job.prompt_ids), out, cached

    def _finished(self) -> None:
        self.job.done = True
        self.state.metrics.finished(self.job.submitted, self.job.first_token, self._usage()[1])

    # ---- whole response -------------------------------------------------------------------------
    async def complete(self, request: Request) -> dict[str, Any]:
        self.state.submit(self.job)
        watcher = watch_disconnect(request, self.state, [self.job])
        try:
            pending = len(self.choices)
            while pending:
                event = await next_event(self.job)
                c = self._record(event)
                c.text.append(event.text)
                pending -= event.finish_reason is not None
            self.job.done = True
        finally:
            watcher.cancel()
            self.state.scheduler.cancel(self.job)
        self._finished()
        out = []
        for c in self.choices:
            self._check_grammar(c)
            content, calls = self._parse(c)
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            reason = c.finish_reason
            if calls:
                message["tool_calls"] = calls
                reason = "tool_calls"
            lp = {"content": chat_logprob_entries(self.state.token_text, c.logprobs),
                  "refusal": None} if self.req.logprobs else None
            out.append({"index": c.index, "message": message, "logprobs": lp,
                        "finish_reason": reason})
        return chat_completion(self.req.model, out, *self._usage())

    # ---- streamed response ----------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[bytes]:
        """SSE chunks; the job is submitted before the first chunk so a full queue is a 429."""
        self.state.submit(self.job)
        return self._chunks(ChatChunks(self.req.model, self.req.include_usage()))

    async def _chunks(self, out: ChatChunks) -> AsyncIterator[bytes]:
        try:
            for c in self.choices:
                c.holding = self.tools_on
                yield out.chunk(c.index, {"role": "assistant", "content": ""})
            pending = len(self.choices)
            ready: list[bytes] = []  # the chunks of the events queued so far: one write
            while pending:
                try:
                    event = await next_event(self.job)
                except APIError as e:
                    yield b"".join(ready) + _error_event(e)
                    return
                c = self._record(event)
                ready += self._deltas(out, c, event)
                pending -= event.finish_reason is not None
                if pending and self.job.events.empty():
                    yield b"".join(ready)
                    ready.clear()
            self.job.done = True
            self._finished()
            if out.include_usage:
                ready.append(out.usage_chunk(*self._usage()))
            yield b"".join(ready) + b"data: [DONE]\n\n"
        finally:
            self.state.scheduler.cancel(self.job)

    def _deltas(self, out: ChatChunks, c: Choice, event: Event) -> list[bytes]:
        chunks: list[bytes] = []
        lp = None
        if event.logprob is not None and not ends_on_stop_token(event):
            lp = chat_logprob_entries(self.state.token_text, [event.logprob])
        text = event.text
        c.text.append(text)
        if c.holding:
            c.held += text
            text = ""
            if not self.forced_tool and not self.syntax.may_start(c.held):
                c.holding, text, c.held = False, c.held, ""
        if lp:
            chunks.append(out.chunk(c.index, {"content": text}, logprobs=lp))
        elif text:
            chunks.append(out.content(c.index, text))
        if event.finish_reason is None:
            return chunks
        if c.constraint is not None and c.constraint.error is not None:
            chunks.append(_error_event(APIError(
                f"constrained generation failed: {c.constraint.error}", 500, type="server_error")))
        reason = c.finish_reason
        if c.holding:
            content, calls = self._parse(c)
            if calls:
                reason = "tool_calls"
                if content:
                    chunks.append(out.chunk(c.index, {"content": content}))
                for i, call in enumerate(calls):
                    head = {**call, "index": i, "function": {"name": call["function"]["name"],
                                                             "arguments": ""}}
                    chunks.append(out.chunk(c.index, {"tool_calls": [head]}))
                    args = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
                    chunks.append(out.chunk(c.index, {"tool_calls": [args]}))
            elif c.held:
                chunks.append(out.chunk(c.index, {"content": c.held}))
        chunks.append(out.chunk(c.index, {}, finish_reason=reason))
        return chunks


def _error_event(err: APIError) -> bytes:
    """An error in the middle of a stream (the status line is already sent)."""
    return sse(err.body())
