"""Token-level grammar constraints with llguidance: JSON schemas and tool calls, enforced per token."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np
import torch

from llamaherd.chat import ToolSyntax
from llamaherd.tokenizer import Tokenizer

# Compact JSON: a small model left free to pick whitespace can pad forever with newlines.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                 "key_separator": ": "}


# A function declared without parameters takes none (as in OpenAI's API): its arguments are {}.
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot enforce exactly (rejected, never run unconstrained)."""


def _regex_literal(text: str) -> str:
    """`text` as a Lark /regex/ that matches it literally."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&~-/" else "\\n" if c == "\n" else c
                   for c in text)


class _Encoder:
    """The callable llguidance uses to tokenize forced text (never parses special tokens)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")
        return self._tokenizer.encode(text)


class _Vocabulary:
    """What `llguidance.TokenizerWrapper` reads: each id's bytes, the special ids and EOS."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(n_vocab):
            if i >= tokenizer.vocab_size:  # padding rows of the output layer: never sampled
                self.tokens.append(f"<|unused_{i}|>".encode())
                self.special_token_ids.append(i)
                continue
            self.tokens.append(tokenizer.decode_bytes([i]))
            if tokenizer.is_special(i):
                self.special_token_ids.append(i)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self._encode = _Encoder(tokenizer)

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class Guidance:
    """llguidance bound to one tokenizer; compiles grammars and makes per-sequence constraints."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        stops = sorted(tokenizer.stop_ids) or [tokenizer.eos_id]
        self.stop_ids = stops
        self.lltokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Vocabulary(tokenizer, n_vocab)), n_vocab=n_vocab,
            eos_token=stops)

    # ---- grammars ------------------------------------------------------------------------------
    def check(self, grammar: str) -> str:
        """Return `grammar` if llguidance can enforce it exactly, else raise GrammarError."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.lltokenizer)
        if is_error:
            raise GrammarError(messages[0].strip().splitlines()[0])
        return grammar

    def json_schema(self, schema: dict[str, Any] | bool | None) -> str:
        """A grammar for JSON text valid under `schema` (None: any JSON object)."""
        if schema is None:
            schema = {"type": "object"}
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError("the schema must be a JSON object")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from e
        return self.check(grammar)

    def tool_call(self, tools: Sequence[tuple[str, dict[str, Any] | None]],
                  syntax: ToolSyntax) -> str:
        """A grammar for exactly one call to one of `tools` (name, JSON schema of its arguments)
        written in `syntax` (begin{"name": ..., "<arguments_key>": {...}}end), each call's
        arguments valid for its tool."""
        lark = "start: " + self._call(tools, syntax)
        return self.check(llguidance.LLMatcher.grammar_from_lark(lark))

    def text_or_tool_call(self, tools: Sequence[tuple[str, dict[str, Any] | None]],
                          syntax: ToolSyntax) -> str:
        """A grammar for tool_choice "auto": free text that does not begin like a call (after any
        whitespace: the syntax's `begin`, or for bare-JSON calls "{" or "["), or exactly one
        call as in `tool_call`. Text stays free; a call, once begun, must be a valid one."""
        heads = [syntax.begin.strip()] if syntax.begin.strip() else ["{", "["]
        starts = "|".join(map(_regex_literal, heads))
        lark = (f"start: TEXT | call\n"
                f"call: {self._call(tools, syntax)}\n"
                f"TEXT: /(?s:.*)/ & ~/(?s:[ \\t\\r\\n]*({starts}).*)/")
        return self.check(llguidance.LLMatcher.grammar_from_lark(lark))

    def _call(self, tools: Sequence[tuple[str, dict[str, Any] | None]],
              syntax: ToolSyntax) -> str:
        """The Lark expansion of one call to one of `tools`."""
        arguments_key = syntax.arguments_key
        if not tools:
            raise GrammarError("no tools to call")
        options = []
        for name, params in tools:
            options.append({
                "type": "object",
                "properties": {"name": {"const": name},
                               arguments_key: params if params else _NO_ARGUMENTS},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            })
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        schema["x-guidance"] = _JSON_OPTIONS  # %json inside Lark reads its options from here
        parts = [self._literal(syntax.begin), f"%json {json.dumps(schema)}",
                 self._literal(syntax.end)]
        return " ".join(p for p in parts if p)

    def _literal(self, text: str) -> str:
        """Lark for `text`: special tokens by name (e.g. <|python_tag|>), the rest quoted."""
        if not text:
            return ""
        parts: list[str] = []
        specials = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
        rest = text
        while rest:
            hit = next((s for s in specials if rest.startswith(s) and s.startswith("<")), None)
            if hit is not None:
                parts.append(hit)
                rest = rest[len(hit):]
                continue
            cut = min((i for s in specials if (i := rest.find(s)) > 0), default=len(rest))
            parts.append(json.dumps(rest[:cut]))
            rest = rest[cut:]
        return " ".join(parts)

    # ---- constraints ---------------------------------------------------------------------------
    def constraint(self, grammar: str) -> GrammarConstraint:
        return GrammarConstraint(self, grammar)


class GrammarConstraint:
    """One sequence's grammar state, used as a logits processor.

    Called with the tokens generated so far and the next-token logits (V,): it first feeds the
    matcher the tokens it has not seen, then sets every logit the grammar forbids to -inf. When the
    grammar is complete only the stop tokens remain allowed. If the matcher ever fails (it cannot
    when its own mask was applied), only stop tokens are allowed and `error` says why.
    """

    def __init__(self, guidance: Guidance, grammar: str) -> None:
        self.guidance = guidance
        self.matcher = llguidance.LLMatcher(guidance.lltokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error().strip().splitlines()[0])
        self._seen = 0
        self._bitmask = np.zeros((guidance.n_vocab + 31) // 32, dtype=np.int32)
        self.error: str | None = None

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a complete match of the grammar."""
        return self.matcher.is_accepting()

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self._seen:]:
            if int(token) in self.guidance.stop_ids:
                continue
            if not self.matcher.consume_token(int(token)) and self.error is None:
                self.error = self.matcher.get_error() or f"token {token} broke the grammar"
        self._seen = len(generated)
        allowed = self._allowed(logits.shape[-1])
        return logits.masked_fill(~allowed, float("-inf"))

    def _allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        if self.error is None:
            self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if self.matcher.is_error():
                self.error = self.matcher.get_error()
        if self.error is not None:
            allowed = np.zeros(vocab, dtype=bool)
            allowed[[i for i in self.guidance.stop_ids if i < vocab]] = True
            return torch.from_numpy(allowed)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[:vocab]
        if not bits.any():  # a dead end the grammar cannot leave
            self.error = "the grammar allows no next token"
            return self._allowed(vocab)
        return torch.from_numpy(bits.astype(bool))
