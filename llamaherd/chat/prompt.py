"""The one way every entry point turns a dialog into a prompt and a reply back into a message.

`chat_format` picks a tokenizer's format, `build_prompt` writes the prompt (offering tools even
to templates that ignore them), and `parse_reply` reads the model's output back. LLM.chat and the
server's chat endpoint both call these.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from llamaherd.chat.format import ChatFormat, ToolSyntax
from llamaherd.chat.jinja import JinjaChatFormat
from llamaherd.chat.llama2 import Llama2ChatFormat
from llamaherd.chat.llama3 import Llama3ChatFormat
from llamaherd.chat.messages import (
    ChatFormatError,
    Message,
    ParsedMessage,
    Tool,
    ToolCall,
    as_messages,
    as_tools,
)
from llamaherd.tokenizer import Tokenizer

# A plain ChatML template for vocabularies with <|im_start|> but no template of their own.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_format(tok: Tokenizer, template: str | None = None, kind: str | None = None,
                **options: Any) -> ChatFormat:
    """The chat format for `tok`.

    `kind` forces one: "jinja" (with `template` or the tokenizer's own), "llama2", "llama3"
    (plain 3.0), "llama3.1" or "chatml". Otherwise: an explicit `template`, else the template the
    tokenizer file carries, else by vocabulary: Llama 3 headers -> Llama 3.1 format (3.0 when the
    vocabulary lacks <|python_tag|>), <|im_start|> -> ChatML, <s>/</s> -> Llama 2. `options` go to
    the format (e.g. `today=` for Llama 3.1, template variables for Jinja).
    """
    specials = tok.special_tokens
    if kind is None:
        if template is not None or tok.chat_template:
            kind = "jinja"
        elif "<|start_header_id|>" in specials:
            kind = "llama3.1" if "<|python_tag|>" in specials else "llama3"
        elif "<|im_start|>" in specials:
            kind = "chatml"
        elif tok.bos_id is not None and tok.eos_id is not None:
            kind = "llama2"
        else:
            raise ChatFormatError(f"{tok.source}: no chat template and no known chat vocabulary")
    if kind == "jinja":
        text = template if template is not None else tok.chat_template
        if not text:
            raise ChatFormatError(f"{tok.source}: the tokenizer has no chat template")
        return JinjaChatFormat(tok, text, **options)
    if kind == "chatml":
        return JinjaChatFormat(tok, CHATML_TEMPLATE, **options)
    if kind == "llama2":
        return Llama2ChatFormat(tok)
    if kind in ("llama3", "llama3.1"):
        return Llama3ChatFormat(tok, version="3" if kind == "llama3" else "3.1", **options)
    raise ChatFormatError(f"unknown chat format kind {kind!r} "
                          "(known: jinja, llama2, llama3, llama3.1, chatml)")


def build_prompt(fmt: ChatFormat, messages: Iterable[Message | Mapping[str, Any]],
                 tools: Iterable[str | Mapping[str, Any] | Tool] | None = None) -> list[int]:
    """Token ids of the prompt asking for the assistant's next reply to `messages`, offering
    `tools`. A format whose template ignores tools (it renders the same with and without them)
    gets them described in the system message instead, and earlier calls written out in the
    format's call syntax, so that any chat model can be offered tools."""
    msgs, offered = as_messages(messages), as_tools(tools)
    syntax = fmt.tool_syntax
    if offered and syntax is not None and fmt.render(msgs, offered) == fmt.render(msgs):
        msgs, offered = describe_tools(msgs, offered, syntax), []
    return fmt.encode_dialog(msgs, offered, add_generation_prompt=True)


def parse_reply(fmt: ChatFormat, text: str, stop_token: int | None,
                tool_names: Collection[str] | None) -> ParsedMessage:
    """The assistant's reply from the text it generated (stop token and stop strings excluded):
    its tool calls to the offered tools `tool_names`, else all of it as text (no tools offered:
    always text)."""
    reason = fmt.stop_reason(stop_token)
    if not tool_names:
        return ParsedMessage(text, [], reason)
    parsed = fmt.parse(text, stop_token, tool_names)
    calls = [c for c in parsed.tool_calls if c.name in tool_names]
    if not calls:
        return ParsedMessage(text, [], reason)
    return ParsedMessage(parsed.content, calls, reason)


def describe_tools(messages: list[Message], tools: list[Tool], syntax: ToolSyntax) -> list[Message]:
    """`messages` with the tools described in the system message (one is added if there is
    none) and every earlier tool call written into its message's text in `syntax`."""
    out = []
    for m in messages:
        if m.tool_calls:
            written = "\n".join(write_call(c, syntax) for c in m.tool_calls)
            text = m.text()
            m = Message(m.role, f"{text}\n{written}" if text else written, None,
                        m.tool_call_id, m.name)
        out.append(m)
    listing = "\n".join(json.dumps(t.to_dict(), ensure_ascii=False) for t in tools)
    example = (f'{syntax.begin}{{"name": <function name>, "{syntax.arguments_key}": '
               f'<JSON object of arguments>}}{syntax.end}')
    note = (f"You may call functions to answer. Available functions:\n<tools>\n{listing}\n"
            f"</tools>\nTo call one, reply with only:\n{example}")
    if out[0].role == "system":
        out[0] = Message("system", f"{out[0].text()}\n\n{note}")
    else:
        out.insert(0, Message("system", note))
    return out


def write_call(call: ToolCall, syntax: ToolSyntax) -> str:
    """One tool call as the model writes it."""
    body = json.dumps({"name": call.name, syntax.arguments_key: call.arguments},
                      ensure_ascii=False)
    return f"{syntax.begin}{body}{syntax.end}"
