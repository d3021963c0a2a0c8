"""build_prompt and parse_reply: the one prompt writer and reply reader that the Python API and
the server share."""

from __future__ import annotations

import json

import pytest

from llamaherd import hub
from llamaherd.chat import (
    JinjaChatFormat,
    Message,
    Tool,
    ToolCall,
    build_prompt,
    chat_format,
    parse_reply,
)
from llamaherd.chat.format import CHATML_TOOL_CALL, LLAMA3_TOOL_CALL
from llamaherd.serve.prompting import chat_prompt_ids
from llamaherd.serve.schemas import ChatCompletionRequest
from llamaherd.tokenizer import Tokenizer, load

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
# A ChatML template that ignores tools altogether.
PLAIN_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_each_format_names_its_tool_call_syntax(smollm: Tokenizer, llama31: Tokenizer) -> None:
    assert chat_format(smollm).tool_syntax == CHATML_TOOL_CALL  # a ChatML vocabulary
    assert chat_format(llama31).tool_syntax == LLAMA3_TOOL_CALL
    assert chat_format(llama31, template="{{ messages }}").tool_syntax == LLAMA3_TOOL_CALL
    assert chat_format(load(hub.pull("llama3-tokenizer")), kind="llama3.1").tool_syntax \
        == LLAMA3_TOOL_CALL


def test_a_template_that_ignores_tools_gets_them_in_the_system_message(smollm: Tokenizer) -> None:
    fmt = JinjaChatFormat(smollm, PLAIN_CHATML)
    call = ToolCall("call_1", "get_weather", {"city": "Paris"})
    dialog = [Message("user", "Weather in Paris?"), Message("assistant", "", [call]),
              Message("tool", '{"temp_c": 21}', tool_call_id="call_1")]
    text = smollm.decode(build_prompt(fmt, dialog, [WEATHER]))
    system, rest = text.split("<|im_end|>", 1)
    assert system.startswith("<|im_start|>system\nYou may call functions")
    assert json.dumps(WEATHER) in system and "<tool_call>" in system
    # the earlier call is written as the model writes calls, where the template shows it
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in rest
    # a system message of the caller's own comes first, the tools after it
    with_system = smollm.decode(build_prompt(fmt, [Message("system", "Be brief."), *dialog],
                                             [WEATHER]))
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\nYou may call functions")


def test_a_format_that_takes_tools_gets_them_as_they_are(llama31: Tokenizer) -> None:
    fmt = chat_format(llama31)
    dialog = [{"role": "user", "content": "Weather in Paris?"}]
    assert build_prompt(fmt, dialog, [WEATHER]) == fmt.encode_dialog(dialog, [WEATHER])
    assert build_prompt(fmt, dialog) == fmt.encode_dialog(dialog)


@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_the_library_and_the_server_build_the_same_prompt(smollm: Tokenizer, tools) -> None:
    fmt = chat_format(smollm)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, **({"tools": tools} if tools else {})})
    assert chat_prompt_ids(fmt, request) == build_prompt(fmt, messages, tools)


def test_parse_reply_reads_calls_to_offered_tools_only(smollm: Tokenizer) -> None:
    fmt = chat_format(smollm)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    reply = parse_reply(fmt, "Let me check.\n" + call, 2, {"get_weather"})
    assert reply.content == "Let me check." and reply.stop_reason == "end_of_turn"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Oslo"})]
    # no tools offered: the whole reply is text, whatever it looks like
    assert parse_reply(fmt, call, 2, None).tool_calls == []
    assert parse_reply(fmt, call, 2, set()).content == call
    # a call to a tool that was not offered stays text
    other = parse_reply(fmt, call, 2, {"get_time"})
    assert other.tool_calls == [] and other.content == call
    assert parse_reply(fmt, "cut", None, {"get_weather"}).stop_reason == "out_of_tokens"


def test_tools_are_accepted_in_every_form(llama31: Tokenizer) -> None:
    fmt = chat_format(llama31)
    dialog = [{"role": "user", "content": "hi"}]
    as_dict = build_prompt(fmt, dialog, [WEATHER])
    assert build_prompt(fmt, dialog, [Tool.from_any(WEATHER)]) == as_dict
    assert build_prompt(fmt, dialog, [WEATHER["function"]]) == as_dict
