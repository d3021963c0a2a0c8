"""Find tool calls in model output, in every form Llama-family and ChatML models write them."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Collection
from typing import Any

from llamaherd.chat.messages import ToolCall

PYTHON_TAG = "<|python_tag|>"
# Hermes/Qwen-style ChatML models: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# Llama 3.1 custom-tool alternative: <function=name>{...}</function>
_FUNCTION_RE = re.compile(r"<function=([^>]+)>\s*(\{.*?\})\s*</function>", re.DOTALL)


def extract_tool_calls(text: str, tool_names: Collection[str] | None = None
                       ) -> tuple[str, list[ToolCall]]:
    """Split model output into (content, tool calls).

    Recognised: `<|python_tag|>` followed by a JSON call, `name.call(key="value")` (a Llama 3.1
    built-in) or code (code_interpreter); `<tool_call>{json}</tool_call>` blocks;
    `<function=name>{json}</function>` blocks; and output that is just a JSON call
    `{"name": ..., "parameters"|"arguments": {...}}` (or a list of them). `tool_names`, when
    given, limits the bare-JSON form to those names, so ordinary JSON answers stay content.
    """
    head, tag, body = text.partition(PYTHON_TAG)
    if tag:
        call = _json_call(body, None) or _builtin_call(body)
        if call is None:
            call = ToolCall.new("code_interpreter", {"code": body})
        return head.strip(), [call]

    calls: list[ToolCall] = []

    def take(match: re.Match[str], make: Any) -> str:
        call = make(match)
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = _TOOL_CALL_RE.sub(lambda m: take(m, lambda m: _json_call(m.group(1), None)), text)
    rest = _FUNCTION_RE.sub(lambda m: take(m, _function_call), rest)
    if calls:
        return rest.strip(), calls
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        bare = _json_calls(stripped, tool_names)
        if bare:
            return "", bare
    return text, []


def _as_call(obj: Any, names: Collection[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI-shaped
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("parameters", obj.get("arguments"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    if names is not None and name not in names:
        return None
    return ToolCall.new(name, args)


def _json_call(s: str, names: Collection[str] | None) -> ToolCall | None:
    try:
        return _as_call(json.loads(s), names)
    except ValueError:
        return None


def _json_calls(s: str, names: Collection[str] | None) -> list[ToolCall]:
    try:
        obj = json.loads(s)
    except ValueError:
        return []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(o, names) for o in items]
    return [c for c in calls if c is not None] if all(calls) else []


def _function_call(m: re.Match[str]) -> ToolCall | None:
    try:
        args = json.loads(m.group(2))
    except ValueError:
        return None
    return ToolCall.new(m.group(1).strip(), args) if isinstance(args, dict) else None


def _builtin_call(s: str) -> ToolCall | None:
    """`brave_search.call(query="...")` -> ToolCall; literal keyword arguments only."""
    try:
        node = ast.parse(s.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "call" and isinstance(node.func.value, ast.Name)
            and not node.args and all(k.arg for k in node.keywords)):
        return None
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        return None
    return ToolCall.new(node.func.value.id, args)
