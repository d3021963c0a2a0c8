"""Guard metrics against counts worked out by hand."""

from __future__ import annotations

import pytest

from llamaherd.safety.metrics import binary, by_category


def test_binary_scores_match_hand_counts() -> None:
    truth = [True, True, True, False, False, False, False, True]
    predicted = [True, True, False, True, False, False, False, True]
    s = binary(truth, predicted)
    assert (s.tp, s.fp, s.tn, s.fn) == (3, 1, 3, 1)
    assert s.precision == 3 / 4 and s.recall == 3 / 4 and s.f1 == pytest.approx(0.75)
    assert s.fpr == 1 / 4
    assert s.to_dict()["f1"] == pytest.approx(0.75)


def test_empty_classes_give_zero_rates_not_errors() -> None:
    s = binary([False, False], [False, False])
    assert (s.precision, s.recall, s.f1, s.fpr) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="2 labels for 1 predictions"):
        binary([True, False], [True])


def test_per_category_scores_are_one_against_the_rest() -> None:
    truth = [["S1"], ["S1", "S10"], ["S10"], [], []]
    predicted = [["S1"], ["S10"], [], ["S1"], []]
    out = by_category(truth, predicted, ["S1", "S2", "S10"])
    assert set(out) == {"S1", "S10"}  # S2: no item and never named
    s1 = out["S1"]
    assert (s1["tp"], s1["fp"], s1["tn"], s1["fn"]) == (1, 1, 2, 1)
    assert s1["n"] == 2 and s1["detected"] == 1.0  # both S1 items were flagged unsafe
    s10 = out["S10"]
    assert (s10["tp"], s10["fp"], s10["fn"]) == (1, 0, 1) and s10["detected"] == 0.5
