"""Prompt scoring (echo): every prompt token's log-probability is a plain forward pass's, whether
the prompts are packed side by side, split across passes and head chunks, or scored alone; and
scoring between two engine steps leaves the KV cache, its prefixes and the running sequences as
they were (tiny random float32 model). Continuations after a shared context score as each
context + continuation alone would, batched or not."""

from __future__ import annotations

import pytest
import torch

from llamaherd import hub
from llamaherd import tokenizer as tok
from llamaherd.generation import Engine, SamplingParams
from llamaherd.generation.scoring import (
    HEAD_CHUNK,
    cache_set_aside,
    continuation_logprobs,
    passes,
    prompt_logprobs,
)
from llamaherd.model import Transformer
from llamaherd.runtime import Runner
from tests.support.models import TINY, make_tiny_model

torch.set_num_threads(2)

VOCAB = 512
LONG = [(7 * i) % VOCAB for i in range(HEAD_CHUNK + 40)]  # two head chunks
PROMPTS = [[5, 6, 7, 8, 9], [100, 200], [300], LONG, list(range(40, 90))]


@pytest.fixture(scope="module")
def tokenizer() -> tok.Tokenizer:
    return tok.load(hub.pull("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_tiny_model(TINY.replace(vocab_size=VOCAB, max_seq_len=512), logit_scale=4)


def reference(model: Transformer, prompt: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward pass over the prompt alone: (T, V)."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)


def test_passes_pack_prompts_up_to_the_budget() -> None:
    assert passes([3, 4, 10, 2, 2], budget=8) == [[0, 1], [2], [3, 4]]
    assert passes([8, 1], budget=8) == [[0], [1]]


@pytest.mark.parametrize("budget", [1, 64, 4096])  # each alone; some packed; all in one pass
def test_scores_equal_a_plain_forward_pass(model: Transformer, budget: int) -> None:
    scored = prompt_logprobs(model, PROMPTS, top=3, budget=budget)
    for prompt, entries in zip(PROMPTS, scored):
        ref = reference(model, prompt)
        assert len(entries) == len(prompt) and entries[0] is None
        for t, e in enumerate(entries[1:], start=1):
            assert e is not None and e.token_id == prompt[t]
            assert abs(e.logprob - float(ref[t - 1, prompt[t]])) < 1e-5
            values, ids = ref[t - 1].topk(3)
            assert [i for i, _ in e.top] == ids.tolist()
            assert max(abs(v - float(w)) for (_, v), w in zip(e.top, values)) < 1e-5


def test_the_top_token_s_value_is_the_chosen_token_s_when_greedy(model: Transformer) -> None:
    # lm-evaluation-harness calls a continuation greedy when each token's logprob equals the
    # largest of its top_logprobs: the two must be the same float
    prompt = [5, 6]
    greedy = int(reference(model, prompt)[-1].argmax())
    [entries] = prompt_logprobs(model, [prompt + [greedy]], top=1)
    assert entries[-1].top[0] == (greedy, entries[-1].logprob)


def test_top_zero_gives_no_alternatives(model: Transformer) -> None:
    [entries] = prompt_logprobs(model, [[1, 2, 3]], top=0)
    assert [e.top for e in entries[1:]] == [[], []]


def test_scoring_needs_the_cache_set_aside(model: Transformer) -> None:
    model.setup_cache(1, 16)
    try:
        with pytest.raises(ValueError, match="without a KV cache"):
            prompt_logprobs(model, [[1, 2]])
    finally:
        model.drop_cache()


def run_steps(engine: Engine, prompt: list[int], steps: int, score_at: int | None = None
              ) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs of one sequence, with engine.score run between two
    steps after `score_at` steps."""
    [seq] = engine.add_group(prompt, SamplingParams(max_new_tokens=steps, temperature=0.0,
                                                    ignore_eos=True, logprobs=0))
    tokens, logprobs = [], []
    for step in range(steps):
        if step == score_at:
            engine.score(PROMPTS, top=2)
        for e in engine.step():
            if e.seq is seq:
                tokens.append(e.token_id)
                logprobs.append(e.logprob.logprob)
    return tokens, logprobs


def test_scoring_between_steps_leaves_the_cache_alone(model: Transformer,
                                                      tokenizer: tok.Tokenizer) -> None:
    prompt = list(range(40, 70))
    alone = run_steps(Engine(Runner(model), tokenizer, rows=2, max_len=512), prompt, 16)
    engine = Engine(Runner(model), tokenizer, rows=2, max_len=512)
    assert run_steps(engine, prompt, 16, score_at=5) == alone
    # the finished sequence's row still holds its prefix, and a prompt sharing it reuses it
    [again] = engine.add_group(prompt + [1], SamplingParams(max_new_tokens=1))
    assert again.cached_tokens == len(prompt)


def test_score_refuses_empty_and_too_long_prompts(model: Transformer,
                                                  tokenizer: tok.Tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=1, max_len=32)
    with pytest.raises(ValueError, match="empty"):
        engine.score([[1], []])
    with pytest.raises(ValueError, match="33 tokens but the context window is 32"):
        engine.score([list(range(33))])


# contexts with 1 to 4 continuations of 1 to 12 tokens; a long context spans two head chunks
GROUPS = [([5, 6, 7], [[8], [9, 10], [11, 12, 13]]),
          ([300], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]),
          (LONG, [[4], [5], [6], [7]]),
          (list(range(40, 90)), [[90, 91], [92]])]


@pytest.fixture
def bare(model: Transformer) -> Transformer:
    """The tiny model without the KV cache an engine test above may have left on it."""
    model.drop_cache()
    return model


@pytest.mark.parametrize("budget", [1, 64, 4096])  # each group alone; some batched; all at once
def test_continuations_score_as_each_context_plus_continuation_alone(bare: Transformer,
                                                                     budget: int) -> None:
    model = bare
    scored = continuation_logprobs(model, GROUPS, budget=budget)
    for (context, conts), results in zip(GROUPS, scored):
        assert len(results) == len(conts)
        for cont, (logprobs, greedy) in zip(conts, results):
            ref = reference(model, context + cont)[len(context) - 1:-1]  # rows predicting cont
            want = [float(ref[j, t]) for j, t in enumerate(cont)]
            assert max(abs(a - b) for a, b in zip(logprobs, want)) < 1e-5
            assert len(logprobs) == len(cont)
            assert greedy == (ref.argmax(-1).tolist() == cont)


def test_a_greedy_continuation_is_marked_greedy(bare: Transformer) -> None:
    model = bare
    context = [5, 6, 7]
    cont = []
    for _ in range(3):
        cont.append(int(reference(model, context + cont)[-1].argmax()))
    [[(_, greedy), (_, other)]] = continuation_logprobs(model, [(context, [cont, cont[:2] + [
        (cont[2] + 1) % VOCAB]])])
    assert greedy and not other


def test_continuation_scoring_needs_the_cache_set_aside(bare: Transformer) -> None:
    model = bare
    model.setup_cache(1, 16)
    try:
        with pytest.raises(ValueError, match="without a KV cache"):
            continuation_logprobs(model, [([1], [[2]])])
        with cache_set_aside(model):
            continuation_logprobs(model, [([1], [[2]])])
        assert model.layers[0].attention.cache is not None
    finally:
        model.drop_cache()
