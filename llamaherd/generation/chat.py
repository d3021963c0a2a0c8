"""Chat on top of generate_stream: messages in, a parsed assistant message (text or tool calls) out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llamaherd.generation.engine import Engine
from llamaherd.generation.generate import generate_stream
from llamaherd.generation.sampling import SamplingParams, TokenLogprob
from llamaherd.generation.sequence import Event


@dataclass
class ChatCompletion:
    """The assistant's reply: `message` is a tokenizer.chat.Message (content or tool_calls)."""

    message: Any
    finish_reason: str  # "stop", "length", "tool_calls" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    @property
    def content(self) -> str | None:
        return self.message.content

    @property
    def tool_calls(self) -> list[Any] | None:
        return self.message.tool_calls


def chat_format(tokenizer: Any) -> Any:
    """The tokenizer's chat format (built once and kept on the tokenizer)."""
    fmt = getattr(tokenizer, "_chat_format", None)
    if fmt is None:
        from llamaherd.tokenizer import chat_format as make_format

        fmt = make_format(tokenizer)
        tokenizer._chat_format = fmt
    return fmt


def chat_prompt(tokenizer: Any, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
    return chat_format(tokenizer).encode_dialog(messages, tools=tools, add_generation_prompt=True)


def chat_stream(engine: Engine, messages: list[Any], params: SamplingParams,
                tools: list[Any] | None = None) -> Iterator[Event]:
    """Events of one assistant reply (params.n must be 1)."""
    if params.n != 1:
        raise ValueError("chat takes n=1")
    yield from generate_stream(engine, [chat_prompt(engine.tokenizer, messages, tools)], params)


def finish_chat(tokenizer: Any, events: list[Event],
                tools: list[Any] | None = None) -> ChatCompletion:
    """Parse the finished reply into a message; a reply with tool calls finishes as tool_calls."""
    from llamaherd.tokenizer.chat import as_tools

    seq = events[-1].seq
    stop_token = seq.stop_reason if isinstance(seq.stop_reason, int) else None
    names = [t.name for t in as_tools(tools)] if tools else None
    message = chat_format(tokenizer).parse(seq.text if seq.params.stop else seq.output_ids,
                                           stop_token, tool_names=names).to_message()
    reason = seq.finish_reason or "cancelled"
    if message.tool_calls:
        reason = "tool_calls"
        events[-1].finish_reason = reason
    logprobs = [e.logprob for e in events if e.logprob is not None] or None
    return ChatCompletion(message, reason, len(seq.prompt_ids), len(seq.output_ids),
                          list(seq.output_ids), logprobs)
