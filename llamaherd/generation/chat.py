"""A chat reply from the engine's events: the parsed assistant message and its usage."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from llamaherd.chat import ChatFormat, Message, ToolCall, parse_reply
from llamaherd.generation.sampling import TokenLogprob
from llamaherd.generation.sequence import Event


@dataclass
class ChatCompletion:
    """The assistant's reply: `message` holds its content or its tool calls."""

    message: Message
    finish_reason: str  # "stop", "length", "tool_calls" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    @property
    def content(self) -> str | None:
        return self.message.content

    @property
    def tool_calls(self) -> list[ToolCall] | None:
        return self.message.tool_calls


def chat_completion(fmt: ChatFormat, events: list[Event],
                    tool_names: Collection[str] | None = None) -> ChatCompletion:
    """The finished reply of one sequence's events, parsed (chat.parse_reply); a reply with tool
    calls finishes as tool_calls."""
    seq = events[-1].seq
    stop_token = seq.stop_reason if isinstance(seq.stop_reason, int) else None
    message = parse_reply(fmt, seq.text, stop_token, tool_names).to_message()
    reason = seq.finish_reason or "cancelled"
    if message.tool_calls:
        reason = "tool_calls"
        events[-1].finish_reason = reason
    logprobs = [e.logprob for e in events if e.logprob is not None] or None
    return ChatCompletion(message, reason, len(seq.prompt_ids), len(seq.output_ids),
                          list(seq.output_ids), logprobs)
