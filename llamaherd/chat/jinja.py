"""Jinja chat templates (GGUF `tokenizer.chat_template`, tokenizer_config.json) in a sandbox."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.parser
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaherd.chat.format import CHATML_TOOL_CALL, LLAMA3_TOOL_CALL, ChatFormat, Segments
from llamaherd.chat.messages import ChatFormatError, Message, Tool
from llamaherd.tokenizer import Tokenizer

# Special-token text inside untrusted strings is swapped for characters from this private-use
# plane while the template renders, then swapped back as untrusted text.
_FIRST, _LAST = 0xF0000, 0xFFFFD
_PRIVATE_RE = re.compile("[\U000F0000-\U000FFFFD]")


def _raise_exception(message: str) -> NoReturn:
    raise ChatFormatError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Hugging Face's version of the filter: plain json.dumps, no HTML escaping, keys unsorted.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


class GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: Hugging Face templates mark the assistant's
    tokens with it (for training masks); rendering a prompt keeps the body as it is."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def make_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in, with the helpers they expect from Hugging Face."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class _Shield:
    """Replaces special-token text in untrusted strings by placeholder characters, and finds
    them again in the rendered prompt."""

    def __init__(self, tok: Tokenizer) -> None:
        self._re = tok.special_pattern
        self.to_char: dict[str, str] = {}
        self.to_text: dict[str, str] = {}
        self._used: set[str] = set()
        self._next = _FIRST

    def note_used(self, s: str) -> None:
        self._used.update(_PRIVATE_RE.findall(s))

    def _char(self, text: str) -> str:
        if text not in self.to_char:
            while chr(self._next) in self._used:
                self._next += 1
            if self._next > _LAST:
                raise ChatFormatError("too many distinct special-token strings in the dialog")
            c = chr(self._next)
            self._next += 1
            self.to_char[text], self.to_text[c] = c, text
        return self.to_char[text]

    def scan(self, value: Any) -> None:
        if isinstance(value, str):
            self.note_used(value)
        elif isinstance(value, dict):
            for v in value.values():
                self.scan(v)
        elif isinstance(value, list):
            for v in value:
                self.scan(v)

    def cover(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._re.sub(lambda m: self._char(m.group()), value) if self._re else value
        if isinstance(value, dict):
            return {k: (v if k == "role" else self.cover(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.cover(v) for v in value]
        return value

    def segments(self, rendered: str) -> Segments:
        if not self.to_text:
            return [(rendered, True)]
        pattern = re.compile("|".join(map(re.escape, self.to_text)))
        segs: Segments = []
        pos = 0
        for m in pattern.finditer(rendered):
            segs += [(rendered[pos:m.start()], True), (self.to_text[m.group()], False)]
            pos = m.end()
        segs.append((rendered[pos:], True))
        return segs


class JinjaChatFormat(ChatFormat):
    """A model's own Jinja chat template. Everything the template writes may hold special
    tokens; special-token text that came from messages or tool definitions stays plain text.

    Tool calls are written as the vocabulary's family writes them: Llama 3's bare JSON where the
    vocabulary has Llama 3's headers, else ChatML's <tool_call> blocks."""

    def __init__(self, tok: Tokenizer, template: str, **template_vars: Any) -> None:
        super().__init__(tok)
        llama3 = tok.token_to_id("<|start_header_id|>") is not None
        self.tool_syntax = LLAMA3_TOOL_CALL if llama3 else CHATML_TOOL_CALL
        self.template_text = template
        self.template_vars = template_vars  # e.g. date_string, tools_in_user_message

    @cached_property
    def _template(self) -> jinja2.Template:
        try:
            return make_environment().from_string(self.template_text)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"chat template does not parse: {e}") from e

    def segments(self, messages: Sequence[Message], tools: list[Tool],
                 add_generation_prompt: bool) -> Segments:
        shield = _Shield(self.tok)
        msg_dicts = [m.to_dict() for m in messages]
        custom = [t.to_dict() for t in tools if not t.builtin]
        builtin = [t.name for t in tools if t.builtin]
        shield.scan(msg_dicts)
        shield.scan(custom)
        context: dict[str, Any] = {
            "messages": shield.cover(msg_dicts),
            "tools": shield.cover(custom) or None,
            "add_generation_prompt": add_generation_prompt,
            **{name: self.tok.id_to_piece(i) for name, i in (
                ("bos_token", self.tok.bos_id), ("eos_token", self.tok.eos_id),
                ("unk_token", self.tok.unk_id), ("pad_token", self.tok.pad_id)) if i is not None},
            **self.template_vars,
        }
        if builtin:
            context["builtin_tools"] = builtin
        try:
            rendered = self._template.render(**context)
        except ChatFormatError:
            raise
        except Exception as e:  # a template can raise anything: undefined names, type errors, ...
            raise ChatFormatError(f"chat template failed to render: {type(e).__name__}: {e}") from e
        return shield.segments(rendered)
