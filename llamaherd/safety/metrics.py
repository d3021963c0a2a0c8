"""How well a guard separates safe from unsafe: precision, recall, F1 and false-positive rate,
overall and per category (Llama Guard) or per class (Prompt Guard)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Scores:
    """Counts of one binary decision (positive = unsafe / flagged) and the rates they give."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, truth: bool, predicted: bool) -> None:
        if truth:
            self.tp, self.fn = self.tp + predicted, self.fn + (not predicted)
        else:
            self.fp, self.tn = self.fp + predicted, self.tn + (not predicted)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def fpr(self) -> float:
        """The share of negatives (safe items) flagged."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "fpr": self.fpr}


def binary(truth: Sequence[bool], predicted: Sequence[bool]) -> Scores:
    """Scores of predictions against the truth, item by item."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels for {len(predicted)} predictions")
    out = Scores()
    for t, p in zip(truth, predicted):
        out.add(bool(t), bool(p))
    return out


def by_category(truth: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                codes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each category with an item: whether an item is in it (truth) against whether the
    guard named it (a one-vs-rest decision over every item), plus `detected`: the share of the
    category's items flagged unsafe at all, whatever categories the guard named."""
    out: dict[str, dict[str, Any]] = {}
    for code in codes:
        scores = binary([code in t for t in truth], [code in p for p in predicted])
        members = [bool(p) for t, p in zip(truth, predicted) if code in t]
        if not members and not scores.fp:
            continue
        out[code] = {**scores.to_dict(), "n": len(members),
                     "detected": sum(members) / len(members) if members else 0.0}
    return out
