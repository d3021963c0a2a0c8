"""POST /v1/chat/completions: one request's choices, collected whole or streamed as SSE chunks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamaherd.chat import parse_reply
from llamaherd.generation.constraints import GrammarConstraint
from llamaherd.generation.sequence import Event
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import (
    ChatChunks,
    chat_completion,
    chat_logprob_entries,
    sse,
    tool_call_dict,
)
from llamaherd.serve.prompting import chat_grammar, chat_prompt_ids, output_budget, sampling_params
from llamaherd.serve.run import Choice, Run
from llamaherd.serve.scheduler import Job
from llamaherd.serve.schemas import ChatCompletionRequest
from llamaherd.serve.state import ServerState, ends_on_stop_token


@dataclass
class ChatChoice(Choice):
    constraint: GrammarConstraint | None = None
    held: str = ""  # streamed text held back while it may be a tool call
    holding: bool = False


class ChatRun(Run):
    """A validated chat request turned into one engine job of n choices."""

    choices: list[ChatChoice]

    def __init__(self, state: ServerState, req: ChatCompletionRequest) -> None:
        state.check_model(req.model)
        if req.n > state.scheduler.max_seqs:
            raise APIError(f"n: {req.n} but the server runs at most "
                           f"{state.scheduler.max_seqs} sequences", param="n")
        self.req = req
        prompt = chat_prompt_ids(state.chat, req)
        budget = output_budget(len(prompt), req.token_limit(), state.context)
        self.syntax = state.chat.tool_syntax
        grammar = chat_grammar(req, state.guidance, self.syntax)
        tool_choice = req.effective_tool_choice()
        self.tools_on = tool_choice != "none"
        self.tool_names = {t.function.name for t in req.tools or []} if self.tools_on else set()
        self.forced_tool = self.tools_on and tool_choice != "auto"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = [ChatChoice(i) for i in range(req.n)]
        if grammar is None:  # one group: the prompt is prefilled once for all n choices
            params = sampling_params(req, budget, logprobs, state.vocab)
            params.n = req.n
            per_choice = [params]
        else:  # every choice needs its own grammar state
            per_choice = []
            for i, c in enumerate(choices):
                c.constraint = state.guidance.constraint(grammar)
                p = sampling_params(req, budget, logprobs, state.vocab, seed_offset=i)
                p.logits_processors = [c.constraint]
                per_choice.append(p)
        conversation = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in req.messages]
        super().__init__(state, [Job(prompt, per_choice)], req.n, choices, [conversation])

    def _grammar_error(self, c: ChatChoice) -> APIError | None:
        if c.constraint is not None and c.constraint.error is not None:
            return APIError(f"constrained generation failed: {c.constraint.error}", 500,
                            type="server_error")
        return None

    def _parse(self, c: ChatChoice) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a finished choice (chat.parse_reply)."""
        seq = c.event.seq  # type: ignore[union-attr]
        stop = seq.stop_reason if isinstance(seq.stop_reason, int) else None
        parsed = parse_reply(self.state.chat, "".join(c.text), stop, self.tool_names)
        calls = [tool_call_dict(tc.id, tc.name, tc.arguments) for tc in parsed.tool_calls]
        return (parsed.content or None) if calls else parsed.content, calls

    # ---- whole response -------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        out = []
        for c in self.choices:
            if c.violation is not None:  # a shield's refusal instead of the answer
                message = {"role": "assistant", "content": c.violation.user_message,
                           "refusal": None}
                out.append({"index": c.index, "message": message, "logprobs": None,
                            "finish_reason": "content_filter",
                            "safety_violation": c.violation.to_dict()})
                continue
            error = self._grammar_error(c)
            if error is not None:
                raise error
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
        return chat_completion(self.req.model, out, *self.usage())

    # ---- streamed response ----------------------------------------------------------------------
    def opening(self) -> list[bytes]:
        self.out = ChatChunks(self.req.model, self.req.include_usage())
        for c in self.choices:
            c.holding = self.tools_on
        return [self.out.chunk(c.index, {"role": "assistant", "content": ""})
                for c in self.choices]

    def closing(self) -> list[bytes]:
        return [self.out.usage_chunk(*self.usage())] if self.out.include_usage else []

    def refusal(self, c: Choice) -> list[bytes]:
        v = c.violation
        assert v is not None
        return [self.out.content(c.index, v.user_message),
                self.out.chunk(c.index, {}, finish_reason="content_filter",
                               extra={"safety_violation": v.to_dict()})]

    def deltas(self, c: ChatChoice, event: Event) -> list[bytes]:  # type: ignore[override]
        out, chunks = self.out, []
        lp = None
        if event.logprob is not None and not ends_on_stop_token(event):
            lp = chat_logprob_entries(self.state.token_text, [event.logprob])
        text = event.text
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
        error = self._grammar_error(c)
        if error is not None:
            chunks.append(sse(error.body()))
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
