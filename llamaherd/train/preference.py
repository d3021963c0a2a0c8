"""Preference data: a prompt with a chosen and a rejected answer, tokenized with loss masks.

One JSON object a line, in the common conversational form:

    {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [assistant message(s)],
     "margin": 2.0 | "strength": 3 | "significantly better"}

or with plain strings for prompt, chosen and rejected (plain text, as for SFT's prompt/completion
rows). Each side is encoded as a prompt/completion example, so its trained tokens are the answer's
and its end-of-turn token. `strength` is Llama 2's four-level label; it becomes a margin for the
reward model's ranking loss by a scale (Llama 2's "large" 3/2/1/0 or "small" 1, 2/3, 1/3, 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaherd.chat import ChatFormat
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.data import DataError, DataStats, Example, encode_row, read_rows

# Llama 2's preference strengths, strongest first, and the margins each scale gives them.
STRENGTHS = ("significantly better", "better", "slightly better", "negligibly better")
MARGIN_SCALES = {"large": (3.0, 2.0, 1.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0)}


@dataclass
class Pair:
    """One preference row tokenized: the prompt followed by each answer."""

    chosen: Example
    rejected: Example
    margin: float  # 0 when the row gives none
    where: str
    reference: tuple[float, float] | None = None  # the reference model's log-probs (DPO)

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def margin_of(row: dict[str, Any], scale: str) -> float:
    """The row's margin: `margin` as given, else its `strength` on `scale`, else 0."""
    if "margin" in row:
        value = row["margin"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError("margin must be a number")
        return float(value)
    if "strength" not in row:
        return 0.0
    strength = row["strength"]
    if isinstance(strength, str) and strength.lower() in STRENGTHS:
        level = 3 - STRENGTHS.index(strength.lower())
    elif isinstance(strength, int) and not isinstance(strength, bool) and 0 <= strength <= 3:
        level = strength
    else:
        raise DataError(f"strength must be 0-3 or one of {', '.join(STRENGTHS)}; got "
                        f"{strength!r}")
    return MARGIN_SCALES[scale][3 - level]


def encode_pair(row: dict[str, Any], fmt: ChatFormat, tokenizer: Tokenizer, where: str = "",
                scale: str = "large") -> Pair:
    """The tokens and masks of one preference row (see the module docstring)."""
    try:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise DataError(f"a preference row needs prompt, chosen and rejected; "
                            f"missing {', '.join(missing)}")
        sides = []
        for key in ("chosen", "rejected"):
            answer = row[key]
            if isinstance(answer, dict):  # one assistant message given bare
                answer = [answer]
            if isinstance(answer, list) and not all(
                    isinstance(m, dict) and m.get("role") == "assistant" for m in answer):
                raise DataError(f"{key} must hold assistant messages only")
            try:
                sides.append(encode_row({"prompt": row["prompt"], "completion": answer,
                                         "tools": row.get("tools")}, fmt, tokenizer))
            except DataError as e:
                raise DataError(str(e).replace("completion", key)) from None
        margin = margin_of(row, scale)
    except DataError as e:
        raise DataError(f"{where}: {e}" if where else str(e)) from None
    chosen, rejected = (Example(ex.tokens, ex.labels, where) for ex in sides)
    return Pair(chosen, rejected, margin, where)


def load_pairs(path: str | Path, fmt: ChatFormat, tokenizer: Tokenizer, max_len: int,
               overlong: str = "truncate", scale: str = "large"
               ) -> tuple[list[Pair], DataStats]:
    """Every row of a preference JSONL file; a side over `max_len` tokens is truncated (the pair
    dropped if that leaves it no trained token) or the pair dropped (`overlong`)."""
    if scale not in MARGIN_SCALES:
        raise ValueError(f"margin scale must be one of {', '.join(MARGIN_SCALES)}")
    stats, pairs = DataStats(), []
    for where, row in read_rows(path):
        stats.rows += 1
        pair = encode_pair(row, fmt, tokenizer, where, scale)
        if max(len(pair.chosen), len(pair.rejected)) > max_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            pair.chosen, pair.rejected = (_cut(pair.chosen, max_len), _cut(pair.rejected,
                                                                            max_len))
            stats.truncated += 1
            if not (pair.chosen.trained and pair.rejected.trained):
                stats.dropped += 1
                continue
        stats.tokens += len(pair)
        stats.trained_tokens += pair.chosen.trained + pair.rejected.trained
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no preference pair to train on ({stats.summary()})")
    return pairs, stats


def _cut(ex: Example, max_len: int) -> Example:
    return Example(ex.tokens[:max_len], ex.labels[:max_len], ex.where)


def sides(pairs: Sequence[Pair]) -> list[Example]:
    """The examples of `pairs` in the order chosen 0, rejected 0, chosen 1, rejected 1, ..."""
    return [ex for p in pairs for ex in (p.chosen, p.rejected)]
