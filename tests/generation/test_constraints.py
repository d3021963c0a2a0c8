"""llguidance constraints on the real SmolLM2 vocabulary: JSON schemas and tool calls."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from llamaherd import tokenizer as tok
from llamaherd.chat import ToolSyntax
from llamaherd.chat.toolcalls import extract_tool_calls
from llamaherd.generation.constraints import GrammarError, Guidance
from llamaherd.hub import DEFAULT_MODEL

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> tok.Tokenizer:
    return tok.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def guidance(tokenizer: tok.Tokenizer) -> Guidance:
    return Guidance(tokenizer, tokenizer.vocab_size)


def constrained_text(tokenizer: tok.Tokenizer, guidance: Guidance, grammar: str, seed: int,
                     limit: int = 300, prefix: str = "", stop: bool = True) -> str:
    """Sample from random logits through the constraint (after the tokens of `prefix`) until a
    stop token, or with stop=False for `limit` tokens; the text made."""
    gen = torch.Generator().manual_seed(seed)
    constraint = guidance.constraint(grammar)
    ids: list[int] = tokenizer.encode(prefix)
    for _ in range(limit):
        logits = constraint(ids, torch.randn(tokenizer.vocab_size, generator=gen) * 3)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if token in tokenizer.stop_ids:
            assert constraint.accepting and constraint.error is None
            return tokenizer.decode(ids)
        ids.append(token)
    if not stop:
        return tokenizer.decode(ids)
    raise AssertionError(f"no stop token after {limit} tokens: {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("seed", range(5))
def test_random_logits_through_a_schema_give_valid_json(tokenizer: tok.Tokenizer,
                                                        guidance: Guidance, seed: int) -> None:
    text = constrained_text(tokenizer, guidance, guidance.json_schema(SCHEMA), seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode_gives_an_object(tokenizer: tok.Tokenizer, guidance: Guidance) -> None:
    grammar = guidance.json_schema(None)
    constraint = guidance.constraint(grammar)
    first = constraint([], torch.zeros(tokenizer.vocab_size))
    allowed = [tokenizer.decode([int(i)]) for i in torch.isfinite(first).nonzero().flatten()]
    assert allowed and all(t.startswith("{") for t in allowed)


def test_a_tool_call_grammar_writes_a_call_the_parser_reads(tokenizer: tok.Tokenizer,
                                                            guidance: Guidance) -> None:
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": False}
    grammar = guidance.tool_call([("get_weather", params), ("get_time", None)],
                                 ToolSyntax("<tool_call>\n", "\n</tool_call>", "arguments"))
    for seed in range(3):
        text = constrained_text(tokenizer, guidance, grammar, seed)
        content, calls = extract_tool_calls(text, {"get_weather", "get_time"})
        assert content == "" and len(calls) == 1, text
        if calls[0].name == "get_weather":
            jsonschema.validate(calls[0].arguments, params)


@pytest.mark.parametrize("begin, end, key", [("<tool_call>\n", "\n</tool_call>", "arguments"),
                                             ("", "", "parameters")])
def test_auto_mode_allows_free_text_or_one_valid_call(tokenizer: tok.Tokenizer,
                                                       guidance: Guidance, begin: str, end: str,
                                                       key: str) -> None:
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": False}
    grammar = guidance.text_or_tool_call([("get_weather", params)], ToolSyntax(begin, end, key))

    def accepts(text: str) -> bool:
        constraint = guidance.constraint(grammar)
        return all(constraint.matcher.consume_token(i) for i in tokenizer.encode(text))

    call = begin + json.dumps({"name": "get_weather", key: {"city": "Paris"}}) + end
    assert accepts("It is sunny in Paris today.") and accepts(call)
    assert accepts("Here is how: " + call)  # a call written inside text stays text
    assert not accepts(call.replace('"city"', '"town"'))  # arguments off the tool's schema
    assert not accepts(call.replace("get_weather", "get_wether"))  # no such tool
    assert not accepts("  " + (begin or "{") + "x")  # text may not begin like a call
    heads = (begin.strip(),) if begin.strip() else ("{", "[")
    for seed in range(3):  # sampled from random logits: text that never begins like a call
        text = constrained_text(tokenizer, guidance, grammar, seed, limit=30, stop=False)
        assert not text.lstrip().startswith(heads), text
        # once a call has begun, it can only go on to a call the parser reads
        text = constrained_text(tokenizer, guidance, grammar, seed, prefix=begin or "{")
        content, calls = extract_tool_calls(text, {"get_weather"})
        assert content == "" and len(calls) == 1, text
        jsonschema.validate(calls[0].arguments, params)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 3, "maximum": 1},
    {"not": {"type": "string"}},
    {"type": "string", "format": "no-such-format"},
    {"$ref": "#/$defs/missing"},
    "not a schema",
])
def test_schemas_that_cannot_be_enforced_are_refused(guidance: Guidance, schema: object) -> None:
    with pytest.raises(GrammarError):
        guidance.json_schema(schema)  # type: ignore[arg-type]
