"""Multiple choice: acc, acc_norm and acc_bytes pick what lm-eval's definitions pick, from
log-likelihoods computed directly with LLM.logits (a tiny random model with the default model's
vocabulary, float32), and their standard errors are lm-eval's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamaherd.api import LLM, load
from llamaherd.eval import Item, encode_pair, mean_stderr, multiple_choice
from llamaherd.eval.multiple_choice import answer, argmax, summarize

ROWS = [
    {"id": "capital", "query": "Question: What is the capital of France?\nAnswer:",
     "choices": ["Paris", "Lyon", "a small village in the mountains of the south"], "gold": 0},
    {"id": "sky", "query": "Question: What colour is the sky on a clear day?\nAnswer:",
     "choices": ["blue", "green", "the colour of fresh grass"], "gold": 0},
    {"id": "accents", "query": "Le dessert s'appelle", "choices": ["crème brûlée", "tarte"],
     "gold": 1},
    {"id": "wino", "queries": ["The trophy didn't fit in the suitcase because the trophy",
                               "The trophy didn't fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "gold": 0},
    {"id": "two", "query": "2 + 2 =", "choices": ["4", "5", "22"], "gold": 0},
]


@pytest.fixture(scope="module")
def llm(sampler_gguf: Path) -> LLM:
    return load(sampler_gguf, dtype="float32")


def direct_loglikelihood(llm: LLM, context: str, continuation: str) -> float:
    """log P(continuation | context) from one forward pass over the whole text."""
    context_ids, ids = encode_pair(llm.tokenizer, context, continuation)
    logp = torch.log_softmax(llm.logits(context_ids + ids).double(), dim=-1)
    return sum(float(logp[len(context_ids) - 1 + j, t]) for j, t in enumerate(ids))


def test_requests_continue_the_query_after_a_space() -> None:
    item = Item.from_row(ROWS[0])
    assert item.requests[1] == ("Question: What is the capital of France?\nAnswer:", " Lyon")
    wino = Item.from_row(ROWS[3])
    assert wino.requests == [(q, " was too big.") for q in ROWS[3]["queries"]]
    assert wino.choices == ROWS[3]["queries"]  # lm-eval's choices for partial evaluation


def test_accuracies_agree_with_directly_computed_loglikelihoods(llm: LLM) -> None:
    result = multiple_choice(llm, ROWS)
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for row, got in zip(ROWS, result.items):
        item = Item.from_row(row)
        lls = [direct_loglikelihood(llm, c, x) for c, x in item.requests]
        assert got.id == row["id"] and got.gold == row["gold"]
        assert got.logprobs == pytest.approx(lls, abs=1e-4)
        pred = max(range(len(lls)), key=lambda i: lls[i])
        norm = max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i]))
        utf8 = max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i].encode()))
        assert (got.pred, got.pred_norm, got.pred_bytes) == (pred, norm, utf8)
        hits["acc"].append(float(pred == row["gold"]))
        hits["acc_norm"].append(float(norm == row["gold"]))
        hits["acc_bytes"].append(float(utf8 == row["gold"]))
    for name, values in hits.items():
        assert result.metrics[name] == sum(values) / len(values)
        assert result.metrics[f"{name}_stderr"] == pytest.approx(mean_stderr(values))
    assert result.n == len(ROWS)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes() -> None:
    item = Item("x", [("q", " ab"), ("q", " éééé"), ("q", " abcdef")], gold=2,
                choices=["ab", "éééé", "abcdef"])
    # per character: -3, -2, -2 (first max: 1); per byte: -3, -1, -2 (max: 1); raw max: 0
    got = answer(item, [-6.0, -8.0, -12.0])
    assert (got.pred, got.pred_norm, got.pred_bytes) == (0, 1, 1)
    got = answer(item, [-6.0, -16.0, -12.0])  # per character: -3, -4, -2; per byte -3, -2, -2
    assert (got.pred, got.pred_norm, got.pred_bytes) == (0, 2, 1)


def test_ties_go_to_the_first_choice_as_numpy_argmax() -> None:
    assert argmax([-1.0, -0.5, -0.5]) == 1
    assert argmax([2.0, 2.0]) == 0


def test_standard_errors_are_lm_eval_s() -> None:
    from lm_eval.api.metrics import mean_stderr as lm_eval_stderr

    for values in ([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.25, 0.5, 1.0, 0.0, 0.75]):
        assert mean_stderr(values) == pytest.approx(lm_eval_stderr(values), rel=1e-12)
    assert mean_stderr([1.0]) is None
    result = summarize([answer(Item("a", [("q", " x"), ("q", " y")], 0, ["x", "y"]),
                               [-1.0, -2.0])])
    assert result.metrics["acc"] == 1.0 and result.metrics["acc_stderr"] is None


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "query": "q", "choices": ["x"], "gold": 1}, "index of one of its 1 choices"),
    ({"id": "b", "query": "q", "choices": ["x", "y"]}, "index of one of its 2 choices"),
    ({"id": "c", "question": "q", "answers": ["x"], "gold": 0}, 'needs "query" and "choices"'),
])
def test_malformed_rows_are_named_in_one_line(row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Item.from_row(row)
