"""`llamaherd serve` end to end: the real default model behind a live server, driven by the official
openai client and raw HTTP (streaming, n > 1, logprobs, seeds, stop, JSON schema, tools, load)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai  # the test extras: pip install -e ".[test]"
import pytest

from llamaherd.hub import DEFAULT_MODEL
from tests.support.server import llamaherd_server

# The exact float32 path of the real default model: answers are checked for content ("Paris"),
# which should not hinge on the speed work in the quantized kernels.
SERVE_OPTIONS = ("--dtype", "float32")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with llamaherd_server(None, "--max-seqs", "8", "--max-queue", "32", "--ctx-size", "2048",
                          *SERVE_OPTIONS, threads=2) as s:
        yield s.url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_lists_the_default_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL]
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL


def test_chat_answers_in_the_openai_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24,
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == DEFAULT_MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_text_as_a_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24,
                                           temperature=0)
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # the same prompt again: all of it is in the cache but its last token, which is prefilled
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_n_choices_each_come_back_with_their_index(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=12,
                                       temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                            max_tokens=8, temperature=1.0, n=2, seed=7,
                                            stream=True)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_a_shared_system_prompt_is_served_from_the_cache(server: str,
                                                         client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are the help desk of a city library. " + " ".join(
        f"Rule {i}: be brief, be polite, and check the catalogue before answering." for i in
        range(25))}  # about 450 tokens
    chats = [[system, {"role": "user", "content": q}]
             for q in ("When do you open?", "Can I renew a book online?")]
    texts = [system["content"] + " Hi", system["content"] + " Bye"]

    def tokens(**body: object) -> list[int]:
        return httpx.post(server + "/tokenize", json=body).json()["tokens"]

    def shared(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    first, second = (client.chat.completions.create(model=DEFAULT_MODEL, messages=m,
                                                    max_tokens=4, temperature=0).usage
                     for m in chats)
    expected = shared(*(tokens(messages=m) for m in chats))
    assert expected > 400 and first.prompt_tokens_details.cached_tokens < 10
    assert second.prompt_tokens_details.cached_tokens == expected
    hi, bye = (client.completions.create(model=DEFAULT_MODEL, prompt=t, max_tokens=2,
                                         temperature=0).usage for t in texts)
    expected_text = shared(*(tokens(prompt=t) for t in texts))
    assert hi.prompt_tokens_details.cached_tokens == 0  # no chat template in front of it
    assert bye.prompt_tokens_details.cached_tokens == expected_text > 400
    metrics = httpx.get(server + "/metrics").text
    counted = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("llamaherd_prompt_tokens_cached_total "))
    assert counted >= expected + expected_text


def test_logprobs_report_the_chosen_token_and_alternatives(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the top one
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token


def test_a_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model=DEFAULT_MODEL, max_tokens=24, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": "Tell me a short story."}])
        return r.choices[0].message.content

    first = ask(1234)
    assert ask(1234) == first
    assert any(ask(s) != first for s in (1, 2))


def test_stop_strings_end_the_answer_and_are_not_returned(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24,
                                       temperature=0, stop=["Paris"])
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital")


def test_logit_bias_bans_and_forces_tokens_with_the_models_own_logprobs(
        client: openai.OpenAI, server: str) -> None:
    def token_id(text: str) -> int:
        ids = httpx.post(server + "/tokenize", json={"prompt": text}).json()["tokens"]
        assert len(ids) == 1, (text, ids)
        return ids[0]

    def ask(bias: dict[str, int]) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                              max_tokens=4, temperature=0, logit_bias=bias,
                                              logprobs=True)

    plain = ask({})
    assert plain.choices[0].message.content.startswith("The")
    banned = ask({str(token_id("The")): -100})
    assert not banned.choices[0].message.content.startswith("The")
    forced = ask({str(token_id("Yes")): 100})
    assert forced.choices[0].message.content == "Yes" * 4
    # the reported log-probability is the model's, not the biased distribution's (~0)
    assert forced.choices[0].logprobs.content[0].logprob < -1


def test_min_tokens_holds_off_the_end_of_the_answer(client: openai.OpenAI) -> None:
    def ask(**extra: int) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=DEFAULT_MODEL, max_tokens=60, temperature=0, extra_body=extra,
            messages=[{"role": "user", "content": "Answer with one word: is the sky blue?"}])

    short = ask()
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 30
    held = ask(min_tokens=30)
    assert held.usage.completion_tokens >= 30
    assert held.choices[0].message.content.startswith(short.choices[0].message.content)


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "city": {"enum": ["Paris", "London", "Rome"]}},
        "required": ["name", "age", "city"], "additionalProperties": False,
    }
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model=DEFAULT_MODEL, max_tokens=80, temperature=temperature, seed=3,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_output_is_a_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Give me a JSON object with a key 'answer'."}],
        response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object, never free text
        assert r.choices[0].message.content.startswith("{")


def test_required_tool_choice_returns_a_valid_call(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather like in Rome?"}]
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=60,
                                       temperature=0, tools=[WEATHER_TOOL],
                                       tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER_TOOL["function"]["parameters"])

    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=60, temperature=0,
        tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                           "function": {"name": "get_weather"}}, stream=True)
    name, args, finish = "", "", None
    for c in stream:
        delta = c.choices[0].delta
        for tc in delta.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather"
    assert json.loads(args) == json.loads(call.function.arguments)


def test_auto_tool_choice_answers_with_text_or_a_well_formed_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "What is the weather like in Rome?"}])
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":  # a call, once begun, is held to the tool's schema
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments),
                                WEATHER_TOOL["function"]["parameters"])
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert not choice.message.tool_calls
    # a tool result goes back into the conversation and the model answers in text
    follow = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=30, temperature=0, tools=[WEATHER_TOOL],
        tool_choice="none", messages=[
            {"role": "user", "content": "What is the weather like in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "sunny"}'},
        ])
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls


def test_text_completions_whole_and_streamed(client: openai.OpenAI) -> None:
    r = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is",
                                  max_tokens=6, temperature=0, logprobs=2)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens == 6
    streamed = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is",
                                         max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    batch = client.completions.create(model=DEFAULT_MODEL, prompt=["One", "Two"], max_tokens=3,
                                      temperature=0, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_tokenize_and_detokenize_round_trip(server: str) -> None:
    ids = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"] == \
        "Hello world"
    chat = httpx.post(server + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["count"] == len(chat["tokens"]) > len(ids)


async def _one(client: httpx.AsyncClient, i: int) -> None:
    body = {"model": DEFAULT_MODEL, "max_tokens": 4 + i % 5, "temperature": 0.8, "seed": i,
            "messages": [{"role": "user", "content": f"Count to {i}."}]}
    if i % 2:
        async with client.stream("POST", "/v1/chat/completions",
                                 json={**body, "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            lines = [ln async for ln in r.aiter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        assert out["usage"]["completion_tokens"] <= body["max_tokens"]


def test_load_64_requests_at_16_way_concurrency(server: str) -> None:
    async def run() -> None:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            async def bounded(i: int) -> None:
                async with limit:
                    await _one(client, i)

            await asyncio.gather(*(bounded(i) for i in range(64)))

    asyncio.run(run())
    metrics = httpx.get(server + "/metrics").text
    assert 'llamaherd_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert 'status="5' not in metrics
    assert "llamaherd_time_to_first_token_seconds_count" in metrics
