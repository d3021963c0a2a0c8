"""Checkers that score a model's reply against a dataset row (a reward in [0, 1]), by name."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

Verifier = Callable[[dict[str, Any], str], float]  # (row, reply text) -> reward in [0, 1]

# A number as people write one: an optional minus (not a dash between two numbers, as in "3-2"),
# digits with or without thousands commas, an optional decimal part and an optional "/denominator".
# It never starts inside another number, and a sentence's final period is not a decimal point.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")
# Where a reply states its final answer; the first number after the last of these is the answer.
_MARKER = re.compile(r"####|answer is|answer:", re.IGNORECASE)


def extract_number(text: str) -> str | None:
    """The reply's final number, without thousands commas ("1,000" -> "1000"; "3/4" stays a
    fraction): the first number after the last "####", "answer is" or "Answer:" when there is
    one, else the last number in the text; None when the text has no number."""
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _NUMBER.search(text, markers[-1].end())
        if after:
            return after.group().replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def parse_number(text: str) -> float | None:
    """The value of a number written as extract_number returns it, or as a dataset's answer
    ("12", "-3.5", "1,000", "3/4"); None when it is not one."""
    text = text.strip().replace(",", "")
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def math_reward(row: dict[str, Any], reply: str) -> float:
    """1.0 when the reply's final number (extract_number) equals the row's "answer" (exactly
    for whole numbers, within 1e-6 for the rest), else 0.0."""
    gold = parse_number(str(row["answer"]))
    if gold is None:
        raise ValueError(f"row answer {row['answer']!r} is not a number")
    found = extract_number(reply)
    value = parse_number(found) if found is not None else None
    return 1.0 if value is not None and math.isclose(value, gold, rel_tol=0, abs_tol=1e-6) \
        else 0.0


VERIFIERS: dict[str, Verifier] = {
    "math": math_reward,
}


def load_verifier(spec: str) -> Verifier:
    """A verifier by name (a key of VERIFIERS) or as "module:function", imported; ValueError
    when there is no such verifier."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown verifier {spec!r}; known: {', '.join(sorted(VERIFIERS))}, "
                         "or give module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise  # a module that exists but fails its own imports
        raise ValueError(f"verifier {spec!r}: no module named {module_name!r}") from None
    if not hasattr(module, attr):
        raise ValueError(f"verifier {spec!r}: {module_name} has no function {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"verifier {spec!r}: {module_name}.{attr} is not a function")
    return fn
