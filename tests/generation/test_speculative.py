"""Speculative decoding gives exactly the plain greedy output, with a draft model or prompt lookup."""

from __future__ import annotations

import copy

import pytest
import torch

from llamaherd import hub
from llamaherd import tokenizer as tok
from llamaherd.api import load
from llamaherd.generation import Engine, SamplingParams, collect
from llamaherd.generation.speculative import ModelDrafter, NgramDrafter, SpeculativeDecoder
from llamaherd.runtime import Runner
from tests.support.models import TINY, make_tiny_model, reference_greedy

torch.set_num_threads(2)

PROMPT = [5, 6, 7, 8, 9, 10]
GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer() -> tok.Tokenizer:
    return tok.load(hub.pull("smollm2-135m-instruct"))

ARGS = TINY.replace(vocab_size=512, max_seq_len=128)

def speculate(engine: Engine, drafter, prompt: list[int], params: SamplingParams, k: int = 4):
    decoder = SpeculativeDecoder(engine, drafter, k=k)
    return collect(decoder.stream(prompt, params))[0], decoder.stats


def test_self_drafting_accepts_everything_and_matches_greedy(tokenizer) -> None:
    target = make_tiny_model(ARGS, seed=0, logit_scale=4)
    engine = Engine(Runner(target), tokenizer)
    out, stats = speculate(engine, ModelDrafter(Runner(copy.deepcopy(target)), 128), PROMPT, GREEDY)
    assert out.token_ids == reference_greedy(target, PROMPT, 40)
    assert stats.acceptance_rate == 1.0
    assert stats.target_forwards <= 1 + 40 // 5 + 1  # k=4: five tokens per verification
    assert engine.idle and engine.free_rows == 1


def test_a_bad_draft_model_still_gives_the_greedy_output(tokenizer) -> None:
    target = make_tiny_model(ARGS, seed=0, logit_scale=4)
    drafter = ModelDrafter(Runner(make_tiny_model(ARGS, seed=1, logit_scale=4)), 128)
    out, stats = speculate(Engine(Runner(target), tokenizer), drafter, PROMPT, GREEDY, k=3)
    assert out.token_ids == reference_greedy(target, PROMPT, 40)
    assert stats.drafted > 0 and stats.acceptance_rate < 0.5


def test_rejections_in_the_middle_roll_back_correctly(tokenizer) -> None:
    """A drafter that is right for two tokens and then wrong exercises partial acceptance."""
    target = make_tiny_model(ARGS, seed=0, logit_scale=4)
    truth = reference_greedy(target, PROMPT, 40)

    class HalfRight:
        def propose(self, ids: list[int], k: int) -> list[int]:
            done = len(ids) - len(PROMPT)
            good = truth[done:done + 2]
            return (good + [(t + 1) % 512 for t in truth[done + 2:done + k]])[:k]

    out, stats = speculate(Engine(Runner(target), tokenizer), HalfRight(), PROMPT, GREEDY, k=4)
    assert out.token_ids == truth
    assert 0.4 < stats.acceptance_rate < 0.6


def test_ngram_drafter_copies_what_followed_the_last_match() -> None:
    d = NgramDrafter(max_ngram=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]
    assert d.propose([1, 2, 3, 4, 2, 3, 7, 2, 3], 3) == [7, 2, 3]  # the latest match wins
    assert d.propose([1, 2, 3], 4) == []


def test_stops_and_limits_apply_inside_an_accepted_run(tokenizer) -> None:
    target = make_tiny_model(ARGS, seed=0, logit_scale=4)
    truth = reference_greedy(target, PROMPT, 40)
    drafter = ModelDrafter(Runner(copy.deepcopy(target)), 128)
    stop = SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[truth[6]])
    out, _ = speculate(Engine(Runner(target), tokenizer), drafter, PROMPT, stop)
    assert out.finish_reason == "stop" and out.token_ids == truth[:truth.index(truth[6])]
    short = SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True)
    out, _ = speculate(Engine(Runner(target), tokenizer), drafter, PROMPT, short)
    assert out.finish_reason == "length" and out.token_ids == truth[:7]


def test_sampling_is_refused() -> None:
    target = make_tiny_model(TINY.replace(vocab_size=64), seed=0, logit_scale=4)
    with pytest.raises(ValueError, match="greedy only"):
        list(SpeculativeDecoder(Engine(Runner(target), None), NgramDrafter()).stream(
            PROMPT, SamplingParams(temperature=0.7)))


def test_real_model_prompt_lookup_and_self_draft_match_plain_greedy() -> None:
    llm = load("smollm2-135m-instruct", dtype="float32")
    text = ("Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the "
            "river bank.\nThe quick brown fox")
    ids = llm.tokenizer.encode(text)
    params = SamplingParams(max_new_tokens=32, temperature=0.0)
    plain = llm.generate(ids, **vars(params))[0]
    assert len(plain.token_ids) >= 10
    engine = Engine(llm.runner, llm.tokenizer, max_len=256)
    out, stats = speculate(engine, NgramDrafter(), ids, params)
    assert out.token_ids == plain.token_ids
    assert stats.accepted > 0 and stats.target_forwards < len(plain.token_ids)
    draft = load("smollm2-135m-instruct", dtype="float32").runner  # a separate copy drafts
    out, stats = speculate(engine, ModelDrafter(draft, 256), ids, params)
    assert out.token_ids == plain.token_ids
    assert stats.acceptance_rate > 0.9
