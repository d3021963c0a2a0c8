"""End to end on the real default model: LLM.generate/stream/chat, and greedy parity with transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llamaherd import hub
from llamaherd.api import LLM, load

torch.set_num_threads(2)

# prompts whose greedy continuation runs 32+ tokens before the model's end-of-text
PARITY_PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n",
    "Here is a list of fruits:\n1.",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        pytest.fail(f"this test needs transformers and accelerate: pip install -e '.[test]' ({e})")
    path = hub.pull("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def test_greedy_generate_equals_transformers_token_for_token(llm: LLM, hf_model) -> None:
    ids = [llm.tokenizer.encode(p, bos=llm.tokenizer.add_bos) for p in PARITY_PROMPTS]
    ours = llm.generate(ids, max_new_tokens=40, temperature=0.0)
    for prompt, c in zip(ids, ours):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                    eos_token_id=sorted(llm.tokenizer.stop_ids))
        ref_new = ref[0, len(prompt):].tolist()
        got = c.token_ids + ([c.stop_reason] if c.finish_reason == "stop" else [])
        assert got == ref_new
        assert len(c.token_ids) >= 32, "choose a prompt with a longer greedy continuation"


def test_generate_accepts_text_ids_and_batches(llm: LLM) -> None:
    one = llm.generate("The capital of France is", max_new_tokens=8, temperature=0.0)
    assert len(one) == 1 and "Paris" in one[0].text
    ids = llm.tokenizer.encode("The capital of France is")
    assert llm.generate(ids, max_new_tokens=8, temperature=0.0)[0].token_ids == one[0].token_ids
    many = llm.generate(["The capital of France is", "def add(a, b):"], max_new_tokens=8,
                        temperature=0.0)
    assert [c.prompt_index for c in many] == [0, 1]
    assert many[0].token_ids == one[0].token_ids


def test_stream_yields_the_same_text_as_generate(llm: LLM) -> None:
    deltas = list(llm.stream("Once upon a time", max_new_tokens=24, temperature=0.0))
    assert len(deltas) > 5
    assert "".join(deltas) == llm.generate("Once upon a time", max_new_tokens=24,
                                           temperature=0.0)[0].text


def test_chat_answers_coherently(llm: LLM) -> None:
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     temperature=0.0, max_new_tokens=40)
    assert reply.finish_reason == "stop"
    assert "Paris" in reply.content and not reply.tool_calls
    streamed = "".join(llm.stream_chat([{"role": "user", "content": "What is the capital of "
                                                                   "France?"}],
                                       temperature=0.0, max_new_tokens=40))
    assert streamed == reply.content


def test_chat_reports_tool_calls(llm: LLM) -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    forced = llm.tokenizer.encode(call) + [llm.tokenizer.eos_id]

    def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -float("inf"))
        out[forced[len(output_ids)]] = 0.0
        return out

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    reply = llm.chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                     temperature=0.0, max_new_tokens=60, logits_processors=[force])
    assert reply.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather",
                                                                  {"city": "Paris"})]


def test_cli_generate_json(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "generate", "smollm2-135m-instruct",
         "The capital of France is", "--json", "--temperature", "0", "--max-new-tokens", "6"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "Paris" in data["text"] and len(data["token_ids"]) == 6
    assert data["finish_reason"] == "length"
    assert set(data["timings"]) == {"load_s", "prefill_tok_s", "decode_tok_s"}
    assert data["usage"]["completion_tokens"] == 6 and data["usage"]["prompt_tokens"] == 5


def test_cli_generate_with_weight_only_quantization() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "generate", "smollm2-135m-instruct",
         "The capital of France is", "--json", "--temperature", "0", "--max-new-tokens", "4",
         "--quant", "int8"],
        capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    assert "Paris" in json.loads(out.stdout)["text"]
    bad = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "generate", "smollm2-135m-instruct", "Hi",
         "--quant", "int3"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "int3" in bad.stderr


def test_cli_reports_context_overflow_in_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "generate", "smollm2-135m-instruct",
         " ".join(["word"] * 9000), "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the prompt has 9000 tokens but the context window is 8192 "
                           "tokens")
    assert "--truncate" in last


def test_float_weights_packed_as_q8_0_run_on_the_kernels(tiny_chat_gguf) -> None:
    """load(quant="q8_0"): the float weights' matrices packed as Q8_0 for the kernels (how a
    trained model's float directory runs fast), logits close to the float model's."""
    exact = load(tiny_chat_gguf, dtype="float32")
    fast = load(tiny_chat_gguf, quant="q8_0")
    assert "GGUFLinear" in repr(fast.model.layers[0].attention)
    ids = list(range(300, 330))
    cos = torch.nn.functional.cosine_similarity(exact.logits(ids), fast.logits(ids), dim=-1)
    assert cos.min() > 0.999
    assert fast.generate("hi", max_new_tokens=3, temperature=0)[0].token_ids
