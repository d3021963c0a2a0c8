"""Multiple choice by log-likelihood: acc, acc_norm and acc_bytes as lm-eval defines them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llamaherd.eval.loglikelihood import loglikelihoods
from llamaherd.generation.scoring import SCORE_PASS_TOKENS

if TYPE_CHECKING:
    from llamaherd.api import LLM

TARGET_DELIMITER = " "  # lm-eval's default: what goes between a context and each answer


@dataclass(frozen=True)
class Item:
    """One question: a (context, continuation) request per choice, the index of the right one,
    and the text of each choice whose length normalizes its log-likelihood."""

    id: str
    requests: list[tuple[str, str]]
    gold: int
    choices: list[str]  # lm-eval's `doc_to_choice` strings (acc_norm divides by their length)

    @staticmethod
    def from_row(row: Mapping[str, Any]) -> Item:
        """An item from a task row: {"id", "query", "choices", "gold"}, each choice continuing the
        query after TARGET_DELIMITER; or, for partial evaluation (WinoGrande), {"id", "queries",
        "continuation", "gold"}: one context per choice, each continued by the same text."""
        row_id = str(row.get("id", ""))
        if "query" in row and "choices" in row:
            choices = [str(c) for c in row["choices"]]
            requests = [(str(row["query"]), TARGET_DELIMITER + c) for c in choices]
        elif "queries" in row and "continuation" in row:
            # lm-eval's choices are these contexts; its WinoGrande reports acc alone
            choices = [str(q) for q in row["queries"]]
            requests = [(q, TARGET_DELIMITER + str(row["continuation"])) for q in choices]
        else:
            raise ValueError(f"item {row_id!r}: a row needs \"query\" and \"choices\", or "
                             f"\"queries\" and \"continuation\"; it has {sorted(row)}")
        gold = row.get("gold")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"item {row_id!r}: \"gold\" must be the index of one of its "
                             f"{len(choices)} choices, got {gold!r}")
        return Item(row_id, requests, gold, choices)


@dataclass(frozen=True)
class Answered:
    """One item's outcome: each choice's summed log-likelihood and the choices picked."""

    id: str
    gold: int
    logprobs: list[float]
    pred: int  # argmax of logprobs
    pred_norm: int  # argmax of logprobs / characters of the choice
    pred_bytes: int  # argmax of logprobs / UTF-8 bytes of the choice


@dataclass
class MCResult:
    """Accuracy over a task's items, with lm-eval's standard errors, and each item's outcome."""

    metrics: dict[str, float | None]  # acc, acc_stderr, acc_norm, acc_norm_stderr, acc_bytes, ...
    items: list[Answered] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.items)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, **self.metrics}
        if samples:
            out["samples"] = [asdict(a) for a in self.items]
        return out


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first on a tie (numpy's argmax, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_stderr(values: Sequence[float]) -> float | None:
    """The standard error of the mean: the sample standard deviation (n - 1) over sqrt(n), as
    lm-eval's `mean_stderr`; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def answer(item: Item, logprobs: Sequence[float]) -> Answered:
    """The choices an item's log-likelihoods pick, raw and length-normalized (lm-eval's
    `process_results` for multiple_choice: acc_norm divides by len(choice), acc_bytes by its UTF-8
    length)."""
    chars = [max(1, len(c)) for c in item.choices]
    utf8 = [max(1, len(c.encode("utf-8"))) for c in item.choices]
    return Answered(item.id, item.gold, list(logprobs), argmax(logprobs),
                    argmax([lp / n for lp, n in zip(logprobs, chars)]),
                    argmax([lp / n for lp, n in zip(logprobs, utf8)]))


def summarize(answered: list[Answered]) -> MCResult:
    """acc, acc_norm and acc_bytes (the share of items whose pick is the gold answer) with their
    standard errors."""
    metrics: dict[str, float | None] = {}
    for name, pick in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_bytes", "pred_bytes")):
        hits = [float(getattr(a, pick) == a.gold) for a in answered]
        metrics[name] = sum(hits) / len(hits) if hits else None
        metrics[f"{name}_stderr"] = mean_stderr(hits)
    return MCResult(metrics, answered)


def multiple_choice(llm: LLM, items: Iterable[Item | Mapping[str, Any]], *,
                    budget: int = SCORE_PASS_TOKENS,
                    progress: Callable[[int, int], None] | None = None) -> MCResult:
    """Score every choice of every item under `llm` and report acc, acc_norm and acc_bytes.

    Items are Item objects or task rows (Item.from_row). Every choice's log-likelihood is
    llamaherd.eval.loglikelihoods of its (context, continuation): the continuation tokenized as
    lm-eval does and its token log-probabilities summed; a question's context is computed once for
    all its choices, and many questions share each forward pass.
    """
    items = [i if isinstance(i, Item) else Item.from_row(i) for i in items]
    requests = [r for item in items for r in item.requests]
    scores = loglikelihoods(llm, requests, budget=budget, progress=progress)
    answered, k = [], 0
    for item in items:
        answered.append(answer(item, [s.logprob for s in scores[k:k + len(item.requests)]]))
        k += len(item.requests)
    return summarize(answered)
