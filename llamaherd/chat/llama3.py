"""Meta's Llama 3 and 3.1 chat formats, written as code (SPECS.md §4)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

from llamaherd.chat.format import LLAMA3_TOOL_CALL, ChatFormat, Segments
from llamaherd.chat.messages import ChatFormatError, Message, Tool
from llamaherd.tokenizer import Tokenizer


class Llama3ChatFormat(ChatFormat):
    """Header-delimited turns. With `version="3.1"` (the default) this follows Meta's Llama 3.1
    chat template: a system turn that always carries the knowledge cut-off and today's date,
    `Environment: ipython` and the built-in tool list when tools are offered, custom JSON tools
    described in the first user message (or the system message with
    `tools_in_user_message=False`), tool results under the `ipython` role, and `<|eom_id|>` after
    a tool call when built-in tools are on. Two deliberate differences from that template follow
    Meta's reference code: a code_interpreter call is written as `<|python_tag|>{code}`, and a
    text tool result is written as is (the template JSON-quotes it). `version="3"` is plain
    Llama 3.0: no automatic system turn.
    """

    tool_syntax = LLAMA3_TOOL_CALL

    def __init__(self, tok: Tokenizer, version: str = "3.1", today: str | dt.date | None = None,
                 tools_in_user_message: bool = True) -> None:
        super().__init__(tok)
        if version not in ("3", "3.1"):
            raise ChatFormatError(f"unknown Llama 3 chat format version {version!r}")
        for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            if t not in tok.special_tokens:
                raise ChatFormatError(f"vocabulary has no {t} token: not a Llama 3 vocabulary")
        self.version = version
        # The Hugging Face 3.1 template's default date; pass `today` for the real one.
        if isinstance(today, dt.date):
            today = today.strftime("%d %b %Y")
        self.today = today or "26 Jul 2024"
        self.tools_in_user_message = tools_in_user_message

    def _special(self, text: str) -> str:
        if text not in self.tok.special_tokens:
            raise ChatFormatError(f"vocabulary has no {text} token (needed for tool calling; "
                                  "Llama 3.0 vocabularies lack it)")
        return text

    def segments(self, messages: Sequence[Message], tools: list[Tool],
                 add_generation_prompt: bool) -> Segments:
        builtin = [t.name for t in tools if t.builtin]
        custom = [t for t in tools if not t.builtin]
        if tools and self.version == "3":
            raise ChatFormatError("tool calling needs the Llama 3.1 format")
        segs: Segments = [("<|begin_of_text|>", True)]
        msgs = list(messages)

        def header(role: str) -> None:
            segs.extend([("<|start_header_id|>", True), (role, False),
                         ("<|end_header_id|>\n\n", True)])

        system = ""
        if msgs[0].role == "system":
            system = msgs.pop(0).text().strip()
        if self.version == "3.1":
            header("system")
            if tools:
                segs.append(("Environment: ipython\n", True))
            if builtin:
                names = ", ".join(n for n in builtin if n != "code_interpreter")
                segs.append((f"Tools: {names}\n\n", True))
            segs.append((f"Cutting Knowledge Date: December 2023\nToday Date: {self.today}\n\n",
                         True))
            if custom and not self.tools_in_user_message:
                segs.append(("You have access to the following functions. To call a function, "
                             "please respond with JSON for a function call." + _RESPOND, True))
                segs += _describe(custom)
            segs += [(system, False), ("<|eot_id|>", True)]
        elif system:
            header("system")
            segs += [(system, False), ("<|eot_id|>", True)]
        if custom and self.tools_in_user_message:
            if not msgs:
                raise ChatFormatError("custom tools go into the first user message, but there is none")
            first = msgs.pop(0)
            header("user")
            segs.append(("Given the following functions, please respond with a JSON for a function "
                         "call with its proper arguments that best answers the given prompt.\n\n"
                         + _RESPOND, True))
            segs += _describe(custom)
            segs += [(first.text().strip(), False), ("<|eot_id|>", True)]
        for m in msgs:
            if m.role in ("tool", "ipython"):
                header("ipython")
                segs += [(m.text(), False), ("<|eot_id|>", True)]
            elif m.tool_calls:
                header("assistant")
                segs += self._tool_call(m, builtin)
            else:
                header(m.role)
                segs += [(m.text().strip(), False), ("<|eot_id|>", True)]
        if add_generation_prompt:
            header("assistant")
        return segs

    def _tool_call(self, m: Message, builtin: list[str]) -> Segments:
        if len(m.tool_calls or ()) != 1:
            raise ChatFormatError("Llama 3.1 supports one tool call per assistant message")
        call = m.tool_calls[0]
        if call.name == "code_interpreter" and call.name in builtin:
            segs = [(self._special("<|python_tag|>"), True), (str(call.arguments.get("code", "")), False)]
        elif call.name in builtin:
            args = ", ".join(f'{k}="{v}"' for k, v in call.arguments.items())
            segs = [(self._special("<|python_tag|>"), True), (f"{call.name}.call({args})", False)]
        else:
            body = json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False)
            segs = [(body, False)]
        end = self._special("<|eom_id|>") if builtin else "<|eot_id|>"
        return segs + [(end, True)]


_RESPOND = ('Respond in the format {"name": function name, "parameters": dictionary of argument '
            'name and its value}.Do not use variables.\n\n')


def _describe(tools: list[Tool]) -> Segments:
    """Custom tools as the 3.1 template lists them: OpenAI-form JSON, 4-space indent."""
    return [(json.dumps(t.to_dict(), indent=4, ensure_ascii=False) + "\n\n", False) for t in tools]
