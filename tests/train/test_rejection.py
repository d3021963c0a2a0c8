"""Rejection sampling through the engine: k answers a prompt, each judged, the best kept and
written as an SFT set (and best-against-worst preference pairs), from Python and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import llamaherd
from llamaherd.train.data import DataError
from llamaherd.train.rejection import (
    prompt_messages,
    read_prompt_rows,
    reward_model_judge,
    sample_best,
    verifier_judge,
)
from llamaherd.train.reward_model import RewardModel, add_score_head

ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}], "answer": str(2 * a),
         "id": f"q{a}"} for a in range(1, 6)]


def characters(row: dict, reply: str) -> float:
    """A verifier for the tests: longer replies are better."""
    return float(len(reply))


@pytest.fixture(scope="module")
def llm(sampler_gguf: Path):
    return llamaherd.load(sampler_gguf)  # packed weights, the engine's fast path


def test_the_best_of_k_is_kept_with_the_rows_fields(llm, tmp_path: Path) -> None:
    kept, report = sample_best(llm, ROWS, verifier_judge(characters), k=4,
                               out=tmp_path / "best.jsonl", pairs_out=tmp_path / "pairs.jsonl",
                               max_new_tokens=12, temperature=1.0, keep_all=True)
    assert report.samples == 20 and report.prompts == 5 and report.samples_per_s > 0
    for row, item in zip(ROWS, kept, strict=True):
        rewards = [s["reward"] for s in item["samples"]]
        assert len(rewards) == 4 and item["reward"] == max(rewards)
        assert item["messages"][:-1] == row["prompt"] and item["id"] == row["id"]
        assert item["messages"][-1]["role"] == "assistant"
        assert len(item["messages"][-1]["content"]) == item["reward"]
        assert len({s["reply"] for s in item["samples"]}) > 1  # k different draws
    assert report.mean_best >= report.mean_reward and report.max_reward == max(
        r["reward"] for r in kept)
    written = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert [w["messages"] for w in written] == [k["messages"] for k in kept]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == report.pairs > 0
    assert all(len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"]) for p in pairs)
    # a seed makes the draws reproducible
    again, _ = sample_best(llm, ROWS, verifier_judge(characters), k=4, max_new_tokens=12,
                           temperature=1.0)
    assert [k["messages"] for k in again] == [k["messages"] for k in kept]


def test_a_reward_model_judges_whole_conversations(sampler_gguf: Path, llm) -> None:
    scorer = llamaherd.load(sampler_gguf, dtype="float32")
    add_score_head(scorer.model, seed=1)
    rm = RewardModel(scorer.model, scorer.tokenizer)
    kept, _ = sample_best(llm, ROWS[:2], reward_model_judge(rm), k=3, max_new_tokens=8)
    for item in kept:
        assert rm.score([item["messages"]])[0] == pytest.approx(item["reward"], abs=1e-5)


def test_prompt_rows(tmp_path: Path) -> None:
    assert prompt_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert prompt_messages({"messages": chat}) == chat[:1]
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n{"question": "y"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: a prompt row needs"):
        read_prompt_rows(path)


def test_cli_with_the_math_verifier(sampler_gguf: Path, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cli = [sys.executable, "-m", "llamaherd.cli", "sample-best", "--model", str(sampler_gguf),
           "--data", str(data), "--out", str(tmp_path / "best.jsonl"), "-k", "2",
           "--max-new-tokens", "6"]
    done = subprocess.run(cli + ["--verifier", "math"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["samples"] == 10 and 0.0 <= report["mean_reward"] <= report["mean_best"] <= 1.0
    assert len((tmp_path / "best.jsonl").read_text().splitlines()) == 5
    neither = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=False)
    assert neither.returncode == 2 and "one of --reward-model and --verifier" in neither.stderr
    unknown = subprocess.run(cli + ["--verifier", "nope"], capture_output=True, text=True,
                             timeout=120, check=False)
    assert unknown.returncode == 1 and "nope" in unknown.stderr
