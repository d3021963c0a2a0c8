"""The ChatFormat interface: how one model family writes a dialog as tokens and reads its reply.

Each format also names its tool-call syntax (ToolSyntax), so that code which enforces or
describes tool calls (grammar constraints, prompts for templates that ignore tools) writes them
the way the model reads them back.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamaherd.chat.messages import (
    Message,
    ParsedMessage,
    StopReason,
    Tool,
    as_messages,
    as_tools,
)
from llamaherd.chat.toolcalls import extract_tool_calls
from llamaherd.tokenizer import Tokenizer

Segments = list[tuple[str, bool]]  # (text, trusted): only trusted text may hold special tokens


@dataclass(frozen=True)
class ToolSyntax:
    """How a model writes one tool call: begin + {"name": ..., arguments_key: {...}} + end."""

    begin: str
    end: str
    arguments_key: str

    def may_start(self, text: str) -> bool:
        """Whether output beginning with `text` may still turn out to be a tool call."""
        t = text.lstrip()
        if self.begin.strip():
            head = self.begin.strip()
            return head.startswith(t) or t.startswith(head)
        return t == "" or t.startswith(("{", "["))


# Llama 3.1's custom-tool calls: the bare JSON object, arguments under "parameters"
LLAMA3_TOOL_CALL = ToolSyntax("", "", "parameters")
# Hermes-style ChatML models: <tool_call> blocks, arguments under "arguments"
CHATML_TOOL_CALL = ToolSyntax("<tool_call>\n", "\n</tool_call>", "arguments")


class ChatFormat:
    """How one model family writes a dialog as tokens and reads its reply back.

    tool_syntax: how the model writes a tool call (None: the format has no tool calling).
    """

    tool_syntax: ToolSyntax | None = None

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def segments(self, messages: Sequence[Message], tools: list[Tool],
                 add_generation_prompt: bool) -> Segments:
        """The prompt as text pieces, marking which are the format's own (trusted) structure."""
        raise NotImplementedError

    def encode_dialog(self, messages: Iterable[Message | Mapping[str, Any]],
                      tools: Iterable[str | Mapping[str, Any] | Tool] | None = None,
                      add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the prompt; message content never turns into special tokens."""
        segs = self.segments(as_messages(messages), as_tools(tools), add_generation_prompt)
        return self.tok.encode_segments(segs)

    def render(self, messages: Iterable[Message | Mapping[str, Any]],
               tools: Iterable[str | Mapping[str, Any] | Tool] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt as text (special tokens written out), for display and debugging."""
        segs = self.segments(as_messages(messages), as_tools(tools), add_generation_prompt)
        return "".join(t for t, _ in segs)

    @property
    def stop_ids(self) -> set[int]:
        return self.tok.stop_ids

    def parse(self, output: str | Sequence[int], stop_token: int | None = None,
              tool_names: Collection[str] | None = None) -> ParsedMessage:
        """Read model output (text, or ids that may end with the stop token) back into an
        assistant message with any tool calls. `tool_names`, when given, limits which JSON
        objects count as calls. `eom` as stop token means the model waits for a tool result."""
        if not isinstance(output, str):
            ids = list(output)
            if stop_token is None and ids and ids[-1] in self.tok.stop_ids:
                stop_token = ids[-1]
            if ids and ids[-1] == stop_token:
                ids = ids[:-1]
            output = self.tok.decode(ids)
        content, calls = extract_tool_calls(output, tool_names)
        return ParsedMessage(content, calls, self.stop_reason(stop_token))

    def stop_reason(self, stop_token: int | None) -> StopReason:
        if stop_token is None:
            return "out_of_tokens"
        if stop_token == self.tok.token_to_id("<|eom_id|>"):
            return "end_of_message"
        return "end_of_turn"

