"""The chat data every entry point shares: messages, tools, tool calls and parsed replies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant", "tool", "ipython")
# Llama 3.1's built-in tools; code_interpreter is turned on by "Environment: ipython" alone.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]


class ChatFormatError(ValueError):
    """A dialog cannot be formatted (bad role, empty dialog, template failure, ...)."""


@dataclass
class ToolCall:
    """A call the assistant makes: `arguments` is already parsed JSON."""

    id: str
    name: str
    arguments: dict[str, Any]

    @staticmethod
    def new(name: str, arguments: dict[str, Any]) -> ToolCall:
        return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=arguments)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ToolCall:
        """From OpenAI's {"id", "type": "function", "function": {"name", "arguments"}} (arguments
        as a JSON string or a dict) or a flat {"id", "name", "arguments"}."""
        fn = d.get("function", d)
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise ChatFormatError(f"tool call arguments are not valid JSON: {args[:60]!r}") from e
        if not isinstance(args, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError("a tool call needs a name and a JSON object of arguments")
        return cls(id=str(d.get("id") or f"call_{uuid.uuid4().hex[:24]}"), name=fn["name"],
                   arguments=args)

    def to_dict(self) -> dict[str, Any]:
        """OpenAI form, with arguments as a dict (what Hugging Face chat templates expect)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Tool:
    """A function the model may call (OpenAI `tools` entry), or a Llama 3.1 built-in tool."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # as given

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TOOLS and not self.parameters

    @classmethod
    def from_any(cls, t: str | Mapping[str, Any] | Tool) -> Tool:
        """From a built-in name ("brave_search"), {"type": "brave_search"}, OpenAI's
        {"type": "function", "function": {...}} or a bare {"name", "description", "parameters"}."""
        if isinstance(t, Tool):
            return t
        if isinstance(t, str):
            if t not in BUILTIN_TOOLS:
                raise ChatFormatError(f"unknown built-in tool {t!r} (known: {', '.join(BUILTIN_TOOLS)})")
            return cls(name=t)
        if not isinstance(t, Mapping):
            raise ChatFormatError(f"a tool must be a dict or a built-in name, got {type(t).__name__}")
        if t.get("type") in BUILTIN_TOOLS:
            return cls(name=t["type"])
        fn = t.get("function", t)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatFormatError("a tool definition needs a function name")
        spec = dict(t) if fn is not t else {"type": "function", "function": dict(t)}
        return cls(name=fn["name"], description=fn.get("description") or "",
                   parameters=dict(fn.get("parameters") or {}), spec=spec)

    def to_dict(self) -> dict[str, Any]:
        """OpenAI form: {"type": "function", "function": {"name", "description", "parameters"}}
        (the caller's own dict when it gave one)."""
        if self.spec is not None:
            return self.spec
        fn: dict[str, Any] = {"name": self.name, "description": self.description}
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass
class Message:
    """One chat message. `content` is text; a tool result may carry JSON-like data instead."""

    role: str
    content: Any = ""
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @classmethod
    def from_any(cls, m: Message | Mapping[str, Any]) -> Message:
        """From a Message or an OpenAI-style dict (content may be a list of text parts)."""
        if isinstance(m, Message):
            msg = m
        elif isinstance(m, Mapping):
            calls = m.get("tool_calls")
            msg = cls(role=m.get("role", ""), content=m.get("content"),
                      tool_calls=[ToolCall.from_dict(c) for c in calls] if calls else None,
                      tool_call_id=m.get("tool_call_id"), name=m.get("name"))
        else:
            raise ChatFormatError(f"a message must be a dict or Message, got {type(m).__name__}")
        if msg.role not in ROLES:
            raise ChatFormatError(f"unknown role {msg.role!r} (expected one of {', '.join(ROLES)})")
        content = msg.content
        if content is None:
            content = ""
        elif isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
            content = "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
        if not isinstance(content, str) and msg.role not in ("tool", "ipython"):
            raise ChatFormatError(f"{msg.role} message content must be text")
        return cls(msg.role, content, msg.tool_calls, msg.tool_call_id, msg.name)

    def to_dict(self) -> dict[str, Any]:
        """The dict a Jinja chat template sees (keys only when set)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d

    def text(self) -> str:
        """Content as text: a tool result that is data is written as JSON."""
        if isinstance(self.content, str):
            return self.content
        return json.dumps(self.content, ensure_ascii=False)


@dataclass
class ParsedMessage:
    """An assistant reply read back from model output."""

    content: str
    tool_calls: list[ToolCall]
    stop_reason: StopReason

    def to_message(self) -> Message:
        return Message("assistant", self.content, self.tool_calls or None)


def as_messages(messages: Iterable[Message | Mapping[str, Any]]) -> list[Message]:
    """Validate and normalise a dialog; an empty one is an error."""
    out = [Message.from_any(m) for m in messages]
    if not out:
        raise ChatFormatError("the dialog has no messages")
    return out


def as_tools(tools: Iterable[str | Mapping[str, Any] | Tool] | None) -> list[Tool]:
    return [Tool.from_any(t) for t in tools or ()]
