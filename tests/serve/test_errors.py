"""Bad input never breaks `llamaherd serve`: each case gets a 4xx OpenAI error object, clients that
vanish free their sequences, a full queue answers 429, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llamaherd.hub import DEFAULT_MODEL
from tests.support.server import llamaherd_server

# The exact float32 path of the real default model: answers are checked for content ("Paris"),
# which should not hinge on the speed work in the quantized kernels.
SERVE_OPTIONS = ("--dtype", "float32")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "Hi"}]
CONTEXT = 1024


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": OK_MESSAGES, "max_tokens": 4, **fields}


def without(key: str) -> dict[str, Any]:
    body = chat()
    del body[key]
    return body


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# (name, path, body: dict to send as JSON or raw bytes, expected status)
CASES: list[tuple[str, str, dict[str, Any] | bytes, int]] = [
    ("malformed json", CHAT, b'{"model": "x", "messages": [', 400),
    ("body is a list", CHAT, b"[1, 2, 3]", 400),
    ("body is a string", CHAT, b'"hello"', 400),
    ("empty body", CHAT, b"", 400),
    ("invalid utf-8", CHAT, (b'{"model": "\xff\xfe", "messages": [{"role": "user", '
                            b'"content": "\xc3\x28"}]}'), 400),
    ("missing model", CHAT, without("model"), 400),
    ("missing messages", CHAT, without("messages"), 400),
    ("empty messages", CHAT, chat(messages=[]), 400),
    ("messages not a list", CHAT, chat(messages="hi"), 400),
    ("message without role", CHAT, chat(messages=[{"content": "hi"}]), 400),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("content is a number", CHAT, chat(messages=[{"role": "user", "content": 12}]), 400),
    ("user content null", CHAT, chat(messages=[{"role": "user", "content": None}]), 400),
    ("tool message without id", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400),
    ("tool_calls on a user message", CHAT, chat(messages=[{"role": "user", "content": "x",
     "tool_calls": [{"id": "1", "type": "function",
                     "function": {"name": "f", "arguments": "{}"}}]}]), 400),
    ("assistant tool call arguments not JSON", CHAT, chat(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "r"}]), 400),
    ("unknown model", CHAT, chat(model="gpt-17"), 404),
    ("negative max_tokens", CHAT, chat(max_tokens=-5), 400),
    ("zero max_tokens", CHAT, chat(max_tokens=0), 400),
    ("huge max_tokens", CHAT, chat(max_tokens=10**9), 400),
    ("max_tokens as text", CHAT, chat(max_tokens="10"), 400),
    ("max_tokens as float", CHAT, chat(max_tokens=1.5), 400),
    ("max_completion_tokens over the window", CHAT, chat(max_completion_tokens=CONTEXT), 400),
    ("negative temperature", CHAT, chat(temperature=-1), 400),
    ("temperature too high", CHAT, chat(temperature=5), 400),
    ("temperature as text", CHAT, chat(temperature="hot"), 400),
    ("top_p zero", CHAT, chat(top_p=0), 400),
    ("top_p above one", CHAT, chat(top_p=1.5), 400),
    ("top_k below -1", CHAT, chat(top_k=-2), 400),
    ("min_p above one", CHAT, chat(min_p=2), 400),
    ("n zero", CHAT, chat(n=0), 400),
    ("n huge", CHAT, chat(n=100), 400),
    ("presence_penalty too high", CHAT, chat(presence_penalty=3), 400),
    ("frequency_penalty too low", CHAT, chat(frequency_penalty=-3), 400),
    ("seed as text", CHAT, chat(seed="abc"), 400),
    ("logit_bias key not a token id", CHAT, chat(logit_bias={"hello": 5}), 400),
    ("logit_bias value too high", CHAT, chat(logit_bias={"42": 101}), 400),
    ("logit_bias token outside the vocabulary", CHAT, chat(logit_bias={"10000000": -100}), 400),
    ("logit_bias not an object", CHAT, chat(logit_bias=[1, 2]), 400),
    ("min_tokens over max_tokens", CHAT, chat(max_tokens=4, min_tokens=8), 400),
    ("negative min_tokens", CHAT, chat(min_tokens=-1), 400),
    ("too many stop strings", CHAT, chat(stop=[str(i) for i in range(20)]), 400),
    ("empty stop string", CHAT, chat(stop=""), 400),
    ("stop of the wrong type", CHAT, chat(stop=5), 400),
    ("top_logprobs too high", CHAT, chat(logprobs=True, top_logprobs=50), 400),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400),
    ("logprobs as a number", CHAT, chat(logprobs=5), 400),
    ("stream as text", CHAT, chat(stream="yes"), 400),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400),
    ("unknown response_format", CHAT, chat(response_format={"type": "xml"}), 400),
    ("json_schema without name", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), 400),
    ("unsatisfiable schema", CHAT, chat(response_format=schema_format(
        {"type": "integer", "minimum": 5, "maximum": 2})), 400),
    ("unsatisfiable required property", CHAT, chat(response_format=schema_format(
        {"type": "object", "required": ["a"], "additionalProperties": False})), 400),
    ("schema keyword the engine cannot enforce", CHAT,
     chat(response_format=schema_format({"not": {"type": "string"}})), 400),
    ("schema with a broken regex", CHAT,
     chat(response_format=schema_format({"type": "string", "pattern": "(("})), 400),
    ("schema with a dangling $ref", CHAT,
     chat(response_format=schema_format({"$ref": "#/definitions/nope"})), 400),
    ("tools not a list", CHAT, chat(tools="x"), 400),
    ("tool with a bad name", CHAT, chat(tools=[{"type": "function",
                                                "function": {"name": "bad name!"}}]), 400),
    ("duplicate tool names", CHAT, chat(tools=[TOOL, TOOL]), 400),
    ("required tool_choice without tools", CHAT, chat(tool_choice="required"), 400),
    ("tool_choice names an unknown function", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "g"}}), 400),
    ("unknown tool_choice", CHAT, chat(tools=[TOOL], tool_choice="sometimes"), 400),
    ("required tool with an unenforceable schema", CHAT, chat(tool_choice="required", tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]), 400),
    ("auto tool with an unenforceable schema", CHAT, chat(tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]), 400),
    ("prompt over the context window", CHAT,
     chat(messages=[{"role": "user", "content": "word " * (CONTEXT + 200)}]), 400),
    ("completion without prompt", "/v1/completions", {"model": DEFAULT_MODEL}, 400),
    ("completion with empty prompt", "/v1/completions", {"model": DEFAULT_MODEL, "prompt": ""},
     400),
    ("completion token id out of range", "/v1/completions",
     {"model": DEFAULT_MODEL, "prompt": [10**7]}, 400),
    ("completion prompt of objects", "/v1/completions",
     {"model": DEFAULT_MODEL, "prompt": [{"a": 1}]}, 400),
    ("completion logprobs too high", "/v1/completions",
     {"model": DEFAULT_MODEL, "prompt": "x", "logprobs": 10}, 400),
    ("completion max_tokens 0 without echo", COMPLETIONS, completion(max_tokens=0), 400),
    ("completion negative max_tokens", COMPLETIONS, completion(max_tokens=-1), 400),
    ("completion echo logprobs too high", COMPLETIONS, completion(echo=True, logprobs=6), 400),
    ("completion prompt list of an empty list", COMPLETIONS, completion(prompt=[[]]), 400),
    ("completion prompt mixing texts and ids", COMPLETIONS, completion(prompt=["a", [1]]), 400),
    ("completion token id list holding a bool", COMPLETIONS, completion(prompt=[[1, True]]),
     400),
    ("completion token id lists out of range", COMPLETIONS,
     completion(prompt=[[1, 2], [3, 10**7]], echo=True, max_tokens=0), 400),
    ("completion too many prompts", COMPLETIONS, completion(prompt=["x"] * 65), 400),
    ("completion stream_options without stream", COMPLETIONS,
     completion(stream_options={"include_usage": True}), 400),
    ("completion echoed prompt over the context window", COMPLETIONS,
     completion(prompt="word " * (CONTEXT + 200), echo=True, logprobs=1, max_tokens=0), 400),
    ("completion prompt over the context window", COMPLETIONS,
     completion(prompt="word " * (CONTEXT + 200)), 400),
    ("chat lone surrogate", CHAT,
     b'{"model": "x", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
    ("chat lone low surrogate in a tool schema", CHAT, (
        b'{"model": "x", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": '
        b'"function", "function": {"name": "f", "parameters": {"\\udc00": 1}}}]}'), 400),
    ("completion lone surrogate", COMPLETIONS, b'{"model": "x", "prompt": ["ok", "\\udfff"]}', 400),
    ("tokenize lone surrogate", "/tokenize", b'{"prompt": "\\ud800"}', 400),
    ("tokenize with nothing", "/tokenize", {}, 400),
    ("detokenize out of range", "/detokenize", {"tokens": [-1]}, 400),
    ("detokenize not a list", "/detokenize", {"tokens": "abc"}, 400),
    ("10 MB body", CHAT, b'{"model": "x", "messages": [{"role": "user", "content": "'
     + b"a" * (10 << 20) + b'"}]}', 413),
]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with llamaherd_server(None, "--max-seqs", "2", "--max-queue", "2", "--ctx-size",
                          str(CONTEXT), *SERVE_OPTIONS, threads=2) as s:
        yield s.url


def assert_error_object(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "\n" not in body["error"]["message"]
    return body["error"]


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 40 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error(server: str, name: str, path: str,
                                       body: dict[str, Any] | bytes, status: int) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=raw, headers={"Content-Type": "application/json"},
                   timeout=60)
    err = assert_error_object(r, status)
    if status == 400 and err["code"] not in ("invalid_json", "invalid_body"):
        # the field and the reason: "messages[0].content: ...", the field also in `param`
        assert err["param"] and err["message"].startswith(err["param"] + ": "), err


def test_wrong_paths_and_methods_get_error_objects(server: str) -> None:
    assert_error_object(httpx.get(server + "/v1/nothing-here"), 404)
    assert_error_object(httpx.get(server + CHAT), 405)
    assert_error_object(httpx.get(server + "/v1/models/gpt-17"), 404)


def running(server: str) -> tuple[float, float]:
    """(running sequences, queued requests) from /metrics."""
    values = {}
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(("llamaherd_running_sequences ", "llamaherd_queue_depth ")):
            name, value = line.split()
            values[name] = float(value)
    return values["llamaherd_running_sequences"], values["llamaherd_queue_depth"]


def wait_idle(server: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while running(server) != (0, 0):
        assert time.monotonic() < deadline, f"still busy: {running(server)}"
        time.sleep(0.2)


def open_stream(server: str, max_tokens: int = 800) -> socket.socket:
    """A streaming request sent over a raw socket, so the test can drop the connection. Its
    schema (a string of 10000 characters or more) forbids ending before max_tokens."""
    body = json.dumps(chat(max_tokens=max_tokens, stream=True, temperature=1.0,
                           response_format=schema_format({"type": "string", "minLength": 10000}),
                           messages=[{"role": "user", "content": "Write a long story."}]))
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    return sock


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server: str) -> None:
    wait_idle(server)
    sock = open_stream(server)
    received = b""
    while received.count(b"data: ") < 4:  # the role chunk and a few tokens
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    assert running(server)[0] == 1
    sock.close()
    wait_idle(server, timeout=15)


def test_a_full_queue_answers_429_and_recovers(server: str) -> None:
    wait_idle(server)
    socks: list[socket.socket] = []
    try:
        for n in range(1, 5):  # 2 running + 2 queued, each in place before the next is sent
            socks.append(open_stream(server))
            deadline = time.monotonic() + 30
            while running(server) != (min(n, 2), max(n - 2, 0)):
                assert time.monotonic() < deadline, running(server)
                time.sleep(0.05)
        assert running(server) == (2, 2)
        r = httpx.post(server + CHAT, json=chat(), timeout=30)
        err = assert_error_object(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"]
    finally:
        for s in socks:
            s.close()
    wait_idle(server, timeout=30)


def test_the_server_still_serves_after_all_that(server: str) -> None:
    assert httpx.get(server + "/health").json()["status"] == "ok"
    r = httpx.post(server + CHAT, json=chat(max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": "What is the capital of France?"}]), timeout=60)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(server + "/metrics").text
    assert 'status="5' not in metrics


def test_a_busy_port_is_a_one_line_error_before_the_model_loads() -> None:
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llamaherd.cli", "serve", "--port", str(port)],
                           check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
