"""The transformers-style wrapper: same call shapes as transformers, same engine underneath."""

from __future__ import annotations

import pytest
import torch

from llamaherd.hf_compat import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer() -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(NAME)


@pytest.fixture(scope="module")
def model() -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(NAME, dtype=torch.float32)


def test_tokenizer_call_decode_and_chat_template(tokenizer: AutoTokenizer) -> None:
    enc = tokenizer("The capital of France is", return_tensors="pt")
    assert enc.input_ids.shape == (1, 5) and enc["attention_mask"].sum() == 5
    assert tokenizer.decode(enc.input_ids[0]) == "The capital of France is"
    assert tokenizer.batch_decode(enc.input_ids) == ["The capital of France is"]
    padded = tokenizer(["Hi", "The capital of France is"], return_tensors="pt", padding=True)
    assert padded.input_ids.shape == (2, 5)
    assert padded.attention_mask[0].tolist() == [0, 0, 0, 0, 1]  # left padding
    chat = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    assert tokenizer.decode(ids[0]) == text


def test_seed_example_greedy_rows_are_prompt_plus_new_tokens(model, tokenizer) -> None:
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(input_ids, max_length=50, num_return_sequences=5)
    assert out.shape[0] == 5 and out.shape[1] <= 50
    assert all(torch.equal(out[0], row) for row in out)  # greedy: five equal rows
    assert torch.equal(out[0, :5], input_ids[0])
    greedy = model.llm.generate(input_ids[0].tolist(), max_new_tokens=45, temperature=0.0)[0]
    new = out[0, 5:].tolist()
    assert new[:len(greedy.token_ids)] == greedy.token_ids
    assert "Paris" in tokenizer.decode(out[0], skip_special_tokens=True)


def test_sampling_is_seeded_by_torch_and_rows_padded_after_eos(model, tokenizer) -> None:
    chat = [{"role": "user", "content": "Say a random animal name."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=24, num_return_sequences=4, do_sample=True)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=24, num_return_sequences=4, do_sample=True)
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) > 1  # different samples
    eos, pad = tokenizer.eos_token_id, model.pad_token_id
    for row in a.tolist():
        new = row[ids.shape[1]:]
        if eos in new:  # everything after the first EOS is padding
            assert all(t == pad for t in new[new.index(eos) + 1:])


def test_call_returns_logits(model, tokenizer) -> None:
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.allclose(logits[0], model.llm.logits(ids[0].tolist()))


def test_max_length_without_room_is_a_clear_error(model, tokenizer) -> None:
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        model.generate(ids, max_length=5)
