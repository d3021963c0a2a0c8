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
        return getattr(self.message, "tool_calls", None)


def chat_format(tokenizer: Any) -> Any:
    """The tokenizer's chat format (built once and kept on the tokenizer)."""
    fmt = getattr(tokenizer, "_chat_format", None)
    if fmt is None:
        from llamaherd.tokenizer.chat import ChatFormat

        fmt = ChatFormat(tokenizer)
        tokenizer._chat_format = fmt
    return fmt


def to_messages(messages: list[Any]) -> list[Any]:
    """Dicts (OpenAI style) or Message objects -> Message objects."""
    from llamaherd.tokenizer.chat import Message, ToolCall

    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"a message must be a dict with a 'role' or a Message, got {m!r}")
        calls = None
        if m.get("tool_calls"):
            calls = [c if isinstance(c, ToolCall) else _tool_call(c) for c in m["tool_calls"]]
        out.append(Message(m["role"], m.get("content") or "", tool_calls=calls,
                           tool_call_id=m.get("tool_call_id"), name=m.get("name")))
    return out


def _tool_call(c: dict[str, Any]) -> Any:
    import json

    from llamaherd.tokenizer.chat import ToolCall

    fn = c.get("function", c)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    return ToolCall(c.get("id", ""), fn["name"], args)


def chat_prompt(tokenizer: Any, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
    return chat_format(tokenizer).encode_dialog(to_messages(messages), tools=tools,
                                                add_generation_prompt=True)


def chat_stream(engine: Engine, messages: list[Any], params: SamplingParams,
                tools: list[Any] | None = None) -> Iterator[Event]:
    """Events of one assistant reply (params.n must be 1)."""
    if params.n != 1:
        raise ValueError("chat takes n=1")
    yield from generate_stream(engine, [chat_prompt(engine.tokenizer, messages, tools)], params)


def finish_chat(tokenizer: Any, events: list[Event]) -> ChatCompletion:
    """Parse the finished reply into a message; a reply with tool calls finishes as tool_calls."""
    seq = events[-1].seq
    stop_token = seq.stop_reason if isinstance(seq.stop_reason, int) else None
    message = chat_format(tokenizer).parse(seq.output_ids, stop_token)
    message = getattr(message, "message", message)
    reason = seq.finish_reason or "cancelled"
    if getattr(message, "tool_calls", None):
        reason = "tool_calls"
        events[-1].finish_reason = reason
    logprobs = [e.logprob for e in events if e.logprob is not None] or None
    return ChatCompletion(message, reason, len(seq.prompt_ids), len(seq.output_ids),
                          list(seq.output_ids), logprobs)
