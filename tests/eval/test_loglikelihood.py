"""Continuation log-likelihoods: split into tokens exactly as lm-eval's own _encode_pair splits
them, and summed from the log-probabilities of a plain forward pass over context + continuation
(a tiny random model with the default model's vocabulary, float32)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llamaherd.api import LLM, load
from llamaherd.eval import encode_pair, loglikelihoods
from llamaherd.eval.loglikelihood import prefix_token

PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("Question: What is the capital of France?\nAnswer:", " Lyon, a city"),
         ("The cat sat on the ", "mat."),  # the context's trailing space moves
         ("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
         ("naïve café ", " crème brûlée"),
         ("x", "y")]  # "xy" may be one token: the continuation would be empty


@pytest.fixture(scope="module")
def llm(sampler_gguf: Path) -> LLM:
    return load(sampler_gguf, dtype="float32")


def reference(llm: LLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Summed log-probability of `continuation` after `context` from LLM.logits, and greedy."""
    # the continuation's last token is only a target, never an input
    logp = torch.log_softmax(llm.logits(context + continuation[:-1]).double(), dim=-1)
    rows = logp[len(context) - 1:]  # the rows that predict the continuation
    total = sum(float(rows[j, t]) for j, t in enumerate(continuation))
    return total, rows.argmax(-1).tolist() == continuation


def test_pairs_split_as_lm_eval_splits_them(llm: LLM) -> None:
    from lm_eval.api.model import TemplateLM

    tok = llm.tokenizer
    theirs = SimpleNamespace(backend="causal",
                             tok_encode=lambda s: tok.encode(s, bos=tok.add_bos))
    for context, continuation in PAIRS:
        want = TemplateLM._encode_pair(theirs, context, continuation)  # type: ignore[arg-type]
        assert encode_pair(tok, context, continuation) == want


def test_trailing_spaces_of_the_context_start_the_continuation(llm: LLM) -> None:
    tok = llm.tokenizer
    context_ids, ids = encode_pair(tok, "The cat sat on the ", "mat.")
    assert context_ids == tok.encode("The cat sat on the")
    assert tok.decode(ids) == " mat."


def test_an_empty_context_is_the_prefix_token(llm: LLM) -> None:
    tok = llm.tokenizer
    assert encode_pair(tok, "", "Hello world") == ([prefix_token(tok)], tok.encode("Hello world"))
    assert prefix_token(tok) == (tok.bos_id if tok.bos_id is not None else tok.eos_id)


def test_loglikelihoods_are_sums_of_a_plain_forward_pass(llm: LLM) -> None:
    requests = [p for p in PAIRS if encode_pair(llm.tokenizer, *p)[1]]
    requests.append(("", "Hello world"))
    for budget in (1, 4096):  # each question alone; all in one pass
        got = loglikelihoods(llm, requests, budget=budget)
        assert len(got) == len(requests)
        for (context, continuation), result in zip(requests, got):
            context_ids, ids = encode_pair(llm.tokenizer, context, continuation)
            logprob, greedy = reference(llm, context_ids, ids)
            assert result.tokens == len(ids)
            assert abs(result.logprob - logprob) < 1e-4, (context, continuation)
            assert result.greedy == greedy


def test_a_greedy_continuation_is_flagged(llm: LLM) -> None:
    context = "Question: What is the capital of France?\nAnswer:"
    ids = llm.tokenizer.encode(context)
    greedy = []
    for _ in range(2):
        greedy.append(int(llm.logits(ids + greedy)[-1].argmax()))
    continuation = llm.tokenizer.decode(greedy)
    if encode_pair(llm.tokenizer, context, continuation)[1] != greedy:
        pytest.skip("the greedy tokens do not re-tokenize to themselves")
    [result] = loglikelihoods(llm, [(context, continuation)])
    assert result.greedy


def test_a_context_longer_than_the_window_keeps_its_last_tokens(llm: LLM) -> None:
    window = llm.args.max_seq_len
    context = " ".join(f"w{i}" for i in range(window))  # well over `window` tokens
    context_ids, ids = encode_pair(llm.tokenizer, context, " end of it")
    assert len(context_ids) > window
    [result] = loglikelihoods(llm, [(context, " end of it")])
    kept = context_ids[-(window + 1 - len(ids)):]  # lm-eval's left truncation
    assert len(kept) + len(ids) - 1 == window
    assert abs(result.logprob - reference(llm, kept, ids)[0]) < 1e-4


def test_a_continuation_without_tokens_of_its_own_is_an_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="no tokens of its own"):
        loglikelihoods(llm, [("Hello", "")])
