"""Sampling settings and the pure sampling functions, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from llamaherd import hub, kernels
from llamaherd import tokenizer as tok
from llamaherd.generation.sampling import (
    SamplingParams,
    apply_penalties,
    draw_torch,
    filtered_logits,
    min_p_filter,
    sample,
    sample_rows,
    token_logprob,
    top_k_filter,
    top_p_filter,
)
from llamaherd.generation.text import TextStream
from tests.support.cases import draw_cases

LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])  # argmax is 3


def draws(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = 300,
          seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [sample(logits, params, g) for _ in range(n)]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"min_p": 2.0}, "min_p must be in [0, 1]"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 3.0}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2]"),
    ({"logprobs": -1}, "logprobs must be None or an integer"),
    ({"stop": [""]}, "stop strings must be non-empty"),
])
def test_sampling_params_reject_out_of_range_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(message)


def test_a_single_stop_string_becomes_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]


def test_temperature_zero_is_greedy() -> None:
    assert set(draws(SamplingParams(temperature=0.0))) == {3}


def test_top_k_1_is_greedy_even_at_high_temperature() -> None:
    assert set(draws(SamplingParams(temperature=50.0, top_k=1))) == {3}


def test_top_k_keeps_exactly_the_k_best() -> None:
    kept = top_k_filter(LOGITS, 2)
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [0, 3]
    assert set(draws(SamplingParams(temperature=50.0, top_k=2))) == {0, 3}


def test_tiny_top_p_is_greedy() -> None:
    assert set(draws(SamplingParams(temperature=50.0, top_p=1e-6))) == {3}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = LOGITS.softmax(-1)  # sorted: 3 (.57), 0 (.21), 5 (.08), 2 (.05), ...
    p = float(probs[3] + probs[0]) - 1e-4  # the two best reach p; the best alone does not
    kept = torch.isfinite(top_p_filter(LOGITS, p)).nonzero().flatten().tolist()
    assert kept == [0, 3]
    p = float(probs[3] + probs[0]) + 1e-4  # now the third one is needed too
    assert torch.isfinite(top_p_filter(LOGITS, p)).nonzero().flatten().tolist() == [0, 3, 5]


def test_min_p_drops_tokens_below_the_scaled_maximum() -> None:
    probs = LOGITS.softmax(-1)
    ratio = probs / probs.max()
    min_p = 0.3
    kept = torch.isfinite(min_p_filter(LOGITS, min_p)).nonzero().flatten().tolist()
    assert kept == (ratio >= min_p).nonzero().flatten().tolist() == [0, 3]
    assert set(draws(SamplingParams(temperature=50.0, min_p=0.99))) == {3}
    # sampling at temperature 1 with min_p 0.3 never draws the four tokens below the threshold
    assert set(draws(SamplingParams(temperature=1.0, min_p=min_p))) == {0, 3}


def test_temperature_scales_logits_before_the_filters() -> None:
    params = SamplingParams(temperature=0.5)
    assert torch.equal(filtered_logits(LOGITS, params), LOGITS / 0.5)
    hot = draws(SamplingParams(temperature=5.0), n=2000)
    cold = draws(SamplingParams(temperature=0.3), n=2000)
    assert cold.count(3) > hot.count(3) + 300


def test_penalties_follow_their_formulas_exactly() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 2.0, 0.0, 3.0])
    out = apply_penalties(logits, seen, counts, repetition=2.0, presence=0.5, frequency=0.25)
    expected = torch.tensor([
        2.0 / 2.0,  # seen, positive: divided; never generated: no presence/frequency
        -1.0 * 2.0 - 0.5 - 0.25 * 2,  # seen, negative: multiplied; generated twice
        0.5,  # untouched
        3.0 - 0.5 - 0.25 * 3,  # not in the repetition set, generated three times
    ])
    assert torch.allclose(out, expected)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input left alone


def test_penalties_change_the_greedy_choice() -> None:
    seen = torch.zeros(6, dtype=torch.bool)
    seen[3] = True
    counts = torch.zeros(6)
    counts[3] = 1
    assert int(apply_penalties(LOGITS, seen, counts, repetition=2.0).argmax()) == 0
    assert int(apply_penalties(LOGITS, seen, counts, presence=1.5).argmax()) == 0
    assert int(apply_penalties(LOGITS, seen, counts, frequency=1.5).argmax()) == 0


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    params = SamplingParams(temperature=1.0)
    assert draws(params, seed=7, n=50) == draws(params, seed=7, n=50)
    assert draws(params, seed=7, n=50) != draws(params, seed=8, n=50)


def test_draws_follow_the_filtered_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs.clamp_min(1e-30))
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample(logits, SamplingParams(temperature=1.0), gen)
                                          for _ in range(n)]), minlength=5)
    assert (counts.float() / n - probs).abs().max() < 0.015  # ~4 standard errors at n=20000
    assert counts[4] == 0
    kept = {sample(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(2000)}
    assert kept == {0, 1}  # filtered tokens are never drawn


def test_rows_sampled_together_draw_what_each_would_alone() -> None:
    # what the engine does each step: every row with its own temperature and generator
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(1)) * 3
    for filters in ({}, {"top_k": 50}, {"top_p": 0.9, "min_p": 0.05}):
        params = [SamplingParams(temperature=t, **filters) for t in (0.3, 0.8, 1.0, 1.7, 0, 0.8)]
        together = [torch.Generator().manual_seed(i) for i in range(6)]
        alone = [torch.Generator().manual_seed(i) for i in range(6)]
        for _ in range(20):
            got = sample_rows(logits, params, together)
            assert got == [sample(row, p, g) for row, p, g in zip(logits, params, alone)]
        assert got[4] == int(logits[4].argmax())  # temperature 0 rows take the argmax
    with pytest.raises(ValueError, match="share top_k, top_p and min_p"):
        sample_rows(logits[:2], [SamplingParams(top_k=5), SamplingParams(top_k=6)], [None, None])


def test_kernel_draw_picks_the_token_whose_cdf_interval_holds_u() -> None:
    """The C++ draw (one pass, float32 weights) and the torch fallback (float64) both return the
    token whose CDF interval holds u, never a forbidden (-inf) one; -1 when all are forbidden."""
    assert kernels.available(), "the C++ kernels did not build: see test_quant_kernels"
    case = draw_cases()
    args = case["logits"], case["temperatures"], case["u"]
    assert torch.equal(kernels.load().draw(*args), case["tokens"])
    assert torch.equal(draw_torch(*args), case["tokens"])
    big = torch.randn(3, 49152, generator=torch.Generator().manual_seed(2)) * 4
    big[1, ::2] = -torch.inf
    u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
    for t in (0.05, 1.0, 20.0):
        got = kernels.load().draw(big, torch.full((3,), t), u)
        assert bool((big[torch.arange(3), got] > -torch.inf).all())
    forbidden = torch.full((2, 40), -torch.inf)
    forbidden[0, 7] = 0.0
    got = kernels.load().draw(forbidden, torch.ones(2), torch.tensor([0.9, 0.9], dtype=torch.float64))
    assert got.tolist() == [7, -1]
    assert draw_torch(forbidden, torch.ones(2), torch.tensor([0.9, 0.9])).tolist() == [7, -1]
    with pytest.raises(ValueError, match="every token of a row has probability 0"):
        sample(forbidden[1], SamplingParams(temperature=1.0))


def test_token_logprob_is_log_softmax_with_sorted_alternatives() -> None:
    info = token_logprob(LOGITS, 2, 3)
    logp = torch.log_softmax(LOGITS, -1)
    assert info.token_id == 2
    assert math.isclose(info.logprob, float(logp[2]), rel_tol=1e-6)
    assert [i for i, _ in info.top] == [3, 0, 5]
    assert all(math.isclose(v, float(logp[i]), rel_tol=1e-6) for i, v in info.top)


# ----- text streaming with stop strings, on the default model's real tokenizer -----

@pytest.fixture(scope="module")
def tokenizer() -> tok.Tokenizer:
    return tok.load(hub.pull("smollm2-135m-instruct"))


def stream_text(tokenizer: tok.Tokenizer, text: str, stop: list[str]) -> tuple[list[str], str | None]:
    stream = TextStream(tokenizer.stream_decoder(), stop)
    deltas = []
    for t in tokenizer.encode(text):
        delta, hit = stream.push(t)
        deltas.append(delta)
        if hit is not None:
            return deltas, hit
    deltas.append(stream.finish())
    return deltas, None


def test_stop_string_is_cut_and_never_streamed(tokenizer: tok.Tokenizer) -> None:
    deltas, hit = stream_text(tokenizer, "The answer is 42.\nUser: and more", ["\nUser:"])
    assert hit == "\nUser:"
    assert "".join(deltas) == "The answer is 42."
    assert not any("\n" in d or "User" in d for d in deltas)


def test_possible_stop_prefix_is_held_back_then_released(tokenizer: tok.Tokenizer) -> None:
    deltas, hit = stream_text(tokenizer, "one END two ENDING", ["ENDX"])
    assert hit is None
    assert "".join(deltas) == "one END two ENDING"
    # "END" could begin "ENDX": it is not emitted with its own token but with a later one
    ids = tokenizer.encode("one END two ENDING")
    pieces = [tokenizer.decode([i]) for i in ids]
    at = next(i for i, p in enumerate(pieces) if "END" in p)
    assert "END" not in deltas[at]


def test_stop_string_across_token_boundaries(tokenizer: tok.Tokenizer) -> None:
    text = "alpha beta gamma delta"
    deltas, hit = stream_text(tokenizer, text, ["ta gam", "zzz"])
    assert hit == "ta gam"
    assert "".join(deltas) == "alpha be"
