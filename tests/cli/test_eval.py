"""`llamaherd eval mc|ppl` on a tiny model and tiny local files: the table printed, the JSON
written, and one-line errors for the mistakes a user can make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamaherd.api import load
from llamaherd.cli import main
from llamaherd.eval import corpus_perplexity, multiple_choice
from llamaherd.eval.tasks import read_jsonl

ROWS = [{"id": "q1", "query": "Question: What is the capital of France?\nAnswer:",
         "choices": ["Paris", "Lyon", "Berlin"], "gold": 0},
        {"id": "q2", "query": "The sky is", "choices": ["blue", "made of cheese"], "gold": 0},
        {"id": "q3", "queries": ["Anna thanked Bea because Anna", "Anna thanked Bea because Bea"],
         "continuation": "had helped her.", "gold": 1}]
TEXTS = ["The lamp had to be lit half an hour before sunset.", "Bread needs flour and water."]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_mc_prints_a_table_and_writes_what_the_python_api_computes(
        sampler_gguf: Path, task_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    code, stdout, stderr = run("eval", "mc", "--model", str(sampler_gguf), "--task",
                               str(task_file), "--dtype", "float32", "--output", str(out))
    assert code == 0, stderr
    header, line = stdout.strip().splitlines()
    assert header.split()[:3] == ["task", "n", "acc"]
    assert line.split()[:2] == [str(task_file), "3"]
    results = json.loads(out.read_text())
    assert results["model"] == str(sampler_gguf) and results["dtype"] == "float32"
    got = results["tasks"][str(task_file)]
    want = multiple_choice(load(sampler_gguf, dtype="float32"), read_jsonl(task_file))
    assert got["n"] == 3 and got["acc"] == want.metrics["acc"]
    assert got["acc_norm"] == want.metrics["acc_norm"]
    assert [s["id"] for s in got["samples"]] == ["q1", "q2", "q3"]
    assert [s["pred"] for s in got["samples"]] == [a.pred for a in want.items]


def test_mc_limit_takes_the_first_items(sampler_gguf: Path, task_file: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    code, _, stderr = run("eval", "mc", "-m", str(sampler_gguf), "-t", str(task_file),
                          "--limit", "2", "-o", str(out))
    assert code == 0, stderr
    assert [s["id"] for s in json.loads(out.read_text())["tasks"][str(task_file)]["samples"]] \
        == ["q1", "q2"]


def test_ppl_over_a_jsonl_file_and_a_text_file(sampler_gguf: Path, tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "ppl.json"
    code, stdout, stderr = run("eval", "ppl", "-m", str(sampler_gguf), "--data", str(data),
                               "--dtype", "float32", "--window", "8", "--stride", "3",
                               "-o", str(out))
    assert code == 0, stderr
    assert stdout.startswith("perplexity ")
    got = json.loads(out.read_text())
    want = corpus_perplexity(load(sampler_gguf, dtype="float32"), TEXTS, window=8, stride=3)
    assert got["documents"] == 2 and got["tokens"] == want.tokens
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)
    assert (got["window"], got["stride"]) == (8, 3)
    text = tmp_path / "doc.txt"
    text.write_text(TEXTS[0])
    code, stdout, stderr = run("eval", "ppl", "-m", str(sampler_gguf), "--data", str(text))
    assert code == 0, stderr
    assert "in 1 documents" in stdout


@pytest.mark.parametrize("args, message", [
    (["mc", "--task", "no-such-task"], "error: unknown task 'no-such-task'"),
    (["ppl", "--dataset", "gsm8k"], "has no text field 'text'"),
    (["ppl", "--window", "8", "--stride", "8"], "need 1 <= stride < window"),
])
def test_mistakes_are_one_line_errors(sampler_gguf: Path, args: list[str],
                                      message: str) -> None:
    code, _, stderr = run("eval", *args[:1], "-m", str(sampler_gguf), *args[1:])
    assert code != 0
    assert message in stderr and len(stderr.strip().splitlines()) == 1
