"""/v1/completions with echo, as lm-evaluation-harness's `local-completions` uses it: the prompt
tokens' log-probabilities (equal to LLM.logits' log_softmax on a float32 model) in OpenAI's
legacy shape, max_tokens 0 and 1, token-id prompts and batches of them, streams, n choices, and
the tokenizer endpoints lm-eval probes (/tokenizer_info, /tokenize, /detokenize)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from llamaherd.api import LLM, load
from tests.support.server import llamaherd_server

MODEL = "tiny-chat"
TEXT = "The capital of France is Paris, and the capital of Italy is Rome."
IDS = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575]


@pytest.fixture(scope="module")
def server(tiny_chat_gguf: Path) -> Iterator[str]:
    with llamaherd_server(str(tiny_chat_gguf), "--dtype", "float32", "--ctx-size", "512",
                          "--max-seqs", "4", threads=1) as s:
        yield s.url


@pytest.fixture(scope="module")
def llm(tiny_chat_gguf: Path) -> LLM:
    return load(tiny_chat_gguf, dtype="float32")


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60, max_retries=0)


def complete(server: str, **fields: Any) -> dict[str, Any]:
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def reference(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of LLM.logits over the prompt: (T, V)."""
    return torch.log_softmax(llm.logits(ids), dim=-1)


def assert_prompt_scored(llm: LLM, lp: dict[str, Any], ids: list[int], text: str,
                         top: int) -> None:
    """The first len(ids) entries of a logprobs object are the prompt's, as LLM.logits gives."""
    ref = reference(llm, ids)
    n = len(ids)
    assert lp["tokens"][:n] == [llm.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, n):
        assert abs(lp["token_logprobs"][t] - float(ref[t - 1, ids[t]])) < 1e-4
        best = llm.tokenizer.decode([int(ref[t - 1].argmax())])
        assert len(lp["top_logprobs"][t]) <= top and best in lp["top_logprobs"][t]
    for token, offset in zip(lp["tokens"][:n], lp["text_offset"][:n]):
        assert text[offset:].startswith(token)


@pytest.mark.parametrize("prompt", [TEXT, IDS], ids=["text", "token ids"])
def test_echo_with_max_tokens_0_scores_the_prompt(server: str, llm: LLM,
                                                  prompt: str | list[int]) -> None:
    ids = llm.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else prompt
    out = complete(server, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    [choice] = out["choices"]
    text = prompt if isinstance(prompt, str) else llm.tokenizer.decode(prompt)
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert_prompt_scored(llm, choice["logprobs"], ids, text, top=2)
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 0


def test_a_batch_of_token_id_lists_over_the_openai_client(client: openai.OpenAI,
                                                          llm: LLM) -> None:
    prompts = [IDS, IDS[:3], [1, 2, 3, 4], IDS[::-1]]
    r = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1,
                                  max_tokens=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for ids, c in zip(prompts, r.choices):
        assert c.text == llm.tokenizer.decode(ids)
        assert_prompt_scored(llm, c.logprobs.model_dump(), ids, c.text, top=1)
    assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_echo_with_max_tokens_1_adds_the_generated_token_as_lm_eval_expects(
        server: str, llm: LLM) -> None:
    # lm-eval's local-completions: echo, logprobs 1, max_tokens 1, temperature 0, token ids; it
    # sums token_logprobs[ctxlen:-1], the last entry being the generated token
    out = complete(server, prompt=[IDS], echo=True, logprobs=1, max_tokens=1, temperature=0,
                   seed=1234)
    [choice] = out["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(IDS) + 1
    assert_prompt_scored(llm, lp, IDS, choice["text"], top=1)
    last = reference(llm, IDS)[-1]
    greedy = int(last.argmax())
    assert lp["tokens"][-1] == llm.tokenizer.decode([greedy])
    assert abs(lp["token_logprobs"][-1] - float(last[greedy])) < 1e-4
    assert choice["text"] == llm.tokenizer.decode(IDS) + llm.tokenizer.decode([greedy])
    assert lp["text_offset"][-1] == len(llm.tokenizer.decode(IDS))


def test_an_echoed_answer_keeps_the_entry_of_the_stop_token_that_ends_it(server: str,
                                                                       llm: LLM) -> None:
    eos = llm.tokenizer.eos_id
    forced = {"prompt": IDS, "logprobs": 1, "max_tokens": 1, "logit_bias": {str(eos): 100}}
    echoed = complete(server, echo=True, **forced)["choices"][0]
    assert echoed["finish_reason"] == "stop" and echoed["text"] == llm.tokenizer.decode(IDS)
    assert len(echoed["logprobs"]["tokens"]) == len(IDS) + 1
    assert echoed["logprobs"]["tokens"][-1] == llm.tokenizer.id_to_piece(eos)
    plain = complete(server, **forced)["choices"][0]  # without echo: as OpenAI's chat API
    assert plain["logprobs"]["tokens"] == []


def test_echo_without_logprobs_puts_the_prompt_before_the_answer(server: str) -> None:
    [choice] = complete(server, prompt=TEXT, echo=True, max_tokens=3, temperature=0)["choices"]
    plain = complete(server, prompt=TEXT, max_tokens=3, temperature=0)["choices"][0]
    assert choice["text"] == TEXT + plain["text"] and choice["logprobs"] is None


def test_each_of_n_choices_of_each_prompt_starts_with_its_prompt(server: str) -> None:
    out = complete(server, prompt=["Hello", "Goodbye"], echo=True, n=2, max_tokens=2, seed=3)
    starts = [c["text"][:len("Hello")] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert starts == ["Hello", "Hello", "Goodb", "Goodb"]


def stream(server: str, **fields: Any) -> list[dict[str, Any]]:
    body = {"model": MODEL, "stream": True, **fields}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_streamed_echo_sends_the_scored_prompt_first(server: str, llm: LLM) -> None:
    whole = complete(server, prompt=TEXT, echo=True, logprobs=1, max_tokens=4, temperature=0)
    chunks = stream(server, prompt=TEXT, echo=True, logprobs=1, max_tokens=4, temperature=0)
    first = chunks[0]["choices"][0]
    assert first["text"] == TEXT and first["finish_reason"] is None
    assert_prompt_scored(llm, first["logprobs"], llm.tokenizer.encode_prompt(TEXT), TEXT, top=1)
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
    joined = {key: [v for c in choices if c["logprobs"] for v in c["logprobs"][key]]
              for key in ("tokens", "token_logprobs", "text_offset")}
    for key, values in joined.items():
        assert values == whole["choices"][0]["logprobs"][key], key
    assert choices[-1]["finish_reason"] == "length"
    [only] = stream(server, prompt=TEXT, echo=True, logprobs=0, max_tokens=0)
    assert only["choices"][0]["text"] == TEXT and only["choices"][0]["finish_reason"] == "length"


def test_requests_scored_together_score_as_alone(server: str) -> None:
    prompts = [IDS[:k] for k in range(2, len(IDS) + 1)]

    def score(ids: list[int]) -> list[float]:
        out = complete(server, prompt=ids, echo=True, logprobs=1, max_tokens=0)
        return out["choices"][0]["logprobs"]["token_logprobs"][1:]

    alone = [score(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(score, prompts))
    for a, b in zip(alone, together):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_scoring_beside_a_running_answer_leaves_the_answer_alone(server: str) -> None:
    request = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "logprobs": 0}
    alone = complete(server, **request)["choices"][0]["logprobs"]
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(complete, server, **request)
        scored = [pool.submit(complete, server, prompt=IDS, echo=True, logprobs=1, max_tokens=0)
                  for _ in range(6)]
        beside = running.result()["choices"][0]["logprobs"]
        assert all(s.result()["choices"][0]["finish_reason"] == "length" for s in scored)
    assert beside["tokens"] == alone["tokens"]
    assert max(abs(x - y) for x, y in zip(beside["token_logprobs"],
                                          alone["token_logprobs"])) < 1e-4


# ---- the tokenizer endpoints -------------------------------------------------------------------
def test_tokenizer_info_names_the_special_tokens(server: str, llm: LLM) -> None:
    info = httpx.get(server + "/tokenizer_info").json()
    tok = llm.tokenizer
    assert info["eos_token"] == "<|im_end|>" and info["eos_token_id"] == tok.eos_id
    assert info["bos_token"] == "<|im_start|>" and info["bos_token_id"] == tok.bos_id
    assert info["model_max_length"] == 512 and info["vocab_size"] == 49152
    assert info["chat_template"] == tok.chat_template and info["add_bos_token"] is False


def test_tokenize_reads_special_token_text_as_hugging_face_does(server: str, llm: LLM) -> None:
    def tokens(**body: Any) -> list[int]:
        return httpx.post(server + "/tokenize", json=body).json()["tokens"]

    text = "<|im_start|>user\nHi<|im_end|>"
    expected = llm.tokenizer.encode(text, allow_special=True)
    assert expected[0] == llm.tokenizer.bos_id and expected[-1] == llm.tokenizer.eos_id
    assert tokens(prompt=text, add_special_tokens=False) == expected
    assert tokens(prompt=TEXT) == llm.tokenizer.encode_prompt(TEXT)


def test_lm_eval_finds_and_uses_the_server_s_tokenizer(server: str, llm: LLM) -> None:
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = server + "/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote = RemoteTokenizer(url)
    assert remote.eos_token_id == llm.tokenizer.eos_id
    assert remote.bos_token_id == llm.tokenizer.bos_id
    assert remote.encode(TEXT) == llm.tokenizer.encode(TEXT)
    assert remote.batch_decode([IDS]) == [llm.tokenizer.decode(IDS)]
