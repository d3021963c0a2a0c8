"""Math answer checking: number extraction, the math reward on real rows, loading by name."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llamaherd import datasets
from llamaherd.train.verifiers import (
    VERIFIERS,
    extract_number,
    load_verifier,
    math_reward,
    parse_number,
)


@pytest.mark.parametrize(("text", "number"), [
    ("She pays 1,000 dollars.", "1000"),
    ("It was 2 degrees, then -3 degrees.", "-3"),
    ("Each costs $3.50.", "3.50"),
    ("Half of 7 is 3.5", "3.5"),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 42", "42"),
    ("The answer is 7. Check: 7 + 1 = 8", "7"),
    ("Answer: $1,234,567.25 in total", "1234567.25"),
    ("I think 12 is wrong; the answer is: -4.", "-4"),
    ("From 3-2 we get 1", "1"),
    ("She uses 3/4 of the flour", "3/4"),
    ("the answer is unclear, maybe 5", "5"),
    ("1, 2, 3", "3"),
    ("no number here", None),
])
def test_extract_number(text: str, number: str | None) -> None:
    assert extract_number(text) == number


def test_parse_number_reads_commas_fractions_and_rejects_words() -> None:
    assert parse_number("1,000") == 1000.0
    assert parse_number("3/4") == 0.75
    assert parse_number("-2.5") == -2.5
    assert parse_number("1/0") is None and parse_number("seven") is None


@pytest.mark.parametrize(("reply", "reward"), [
    ("The answer is 7.", 1.0),
    ("7.0000001", 1.0),  # within 1e-6
    ("7.001", 0.0),
    ("14/2", 1.0),
    ("It is seven.", 0.0),
    ("", 0.0),
])
def test_math_reward_compares_numbers(reply: str, reward: float) -> None:
    assert math_reward({"answer": "7"}, reply) == reward


@pytest.fixture(scope="module")
def math_rows() -> list[datasets.Row]:
    return datasets.rows("asdiv", quiet=True) + datasets.rows("gsm8k", quiet=True)


def test_gold_answer_in_a_sentence_scores_one_and_a_wrong_one_zero(math_rows) -> None:
    for row in math_rows:
        gold = float(row["answer"])
        written = f"{int(gold):,}" if gold.is_integer() else row["answer"]  # "2,125"
        reply = f"Adding up 3 and 4 parts, the answer is {written}. So 12 in all was wrong."
        assert math_reward(row, reply) == 1.0, row["id"]
        wrong = Decimal(row["answer"]) + 1 + abs(Decimal(row["answer"]))  # far from the answer
        assert math_reward(row, f"First 5, then #### {wrong}") == 0.0, row["id"]
        assert math_reward(row, f"So she has {written}.") == 1.0, row["id"]


def test_unnumbered_row_answer_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a number"):
        math_reward({"answer": "Mrs. Hilt"}, "5")


def half_reward(row: dict, reply: str) -> float:
    return 0.5


def test_load_verifier_by_name_or_module_function() -> None:
    assert load_verifier("math") is VERIFIERS["math"] is math_reward
    assert load_verifier("llamaherd.train.verifiers:math_reward") is math_reward
    assert load_verifier(f"{__name__}:half_reward")({}, "") == 0.5


@pytest.mark.parametrize(("spec", "message"), [
    ("maths", "unknown verifier 'maths'; known: math"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("llamaherd.train.verifiers:nothing", "has no function 'nothing'"),
])
def test_load_verifier_rejects_unknown_names(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_verifier(spec)


def test_load_verifier_rejects_what_is_not_a_function() -> None:
    with pytest.raises(TypeError, match="is not a function"):
        load_verifier("llamaherd.train.verifiers:VERIFIERS")


def test_large_whole_answers_must_match_exactly() -> None:
    assert math_reward({"answer": "1059955"}, "1,059,955") == 1.0
    assert math_reward({"answer": "1059955"}, "1059956") == 0.0
