"""Reward models and DPO end to end on a tiny model with the default model's vocabulary: each
moves its held-out measure the right way, writes a directory that loads, and scores or runs from
the command line; a reward model trains on two processes as on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaherd
import llamaherd.train
from llamaherd.train.reward_model import RewardModel, combine_rewards

CLI = [sys.executable, "-m", "llamaherd.cli"]


def rows(n: int, offset: int = 0) -> list[dict]:
    """Arithmetic questions; the chosen answer gives the sum, the rejected one declines."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 9 + 1, (i * 7) % 8 + 1
        out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                    "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                    "rejected": [{"role": "assistant", "content": "I would rather not say."}],
                    "strength": i % 4})
    return out


def write(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return write(folder / "train.jsonl", rows(48)), write(folder / "held.jsonl", rows(16, 100))


def run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_reward_model_learns_to_rank_and_scores_from_the_cli(
        tiny_chat_gguf: Path, pairs: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = pairs
    out = llamaherd.train.reward(model=str(tiny_chat_gguf), data=str(train), val_data=str(held),
                                 out=str(tmp_path / "rm"), steps=20, lr=1e-3,
                                 precision="float32", eval_every=10)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy_after"] == 1.0 > summary["eval_accuracy_before"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]

    rm = RewardModel.load(out)
    good, bad = rm.score([
        [{"role": "user", "content": "What is 2 plus 2?"},
         {"role": "assistant", "content": "2 plus 2 is 4."}],
        [{"role": "user", "content": "What is 2 plus 2?"},
         {"role": "assistant", "content": "I would rather not say."}]])
    assert good > bad
    # batching does not change a score
    assert rm.score([[{"role": "user", "content": "What is 2 plus 2?"},
                      {"role": "assistant", "content": "2 plus 2 is 4."}]])[0] == \
        pytest.approx(good, abs=1e-5)
    # the directory also loads as a model that runs
    assert llamaherd.load(out, dtype="float32").generate("Hi", max_new_tokens=3)[0].text is not None

    done = run(CLI + ["score", "--model", str(out), "--data", str(held)])
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 16 and all(r["chosen"] > r["rejected"] for r in lines)

    bad_file = write(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    done = run(CLI + ["score", "--model", str(out), "--data", str(bad_file)])
    assert done.returncode == 1 and "bad.jsonl:1:" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    not_rm = run(CLI + ["score", "--model", str(tiny_chat_gguf), "--data", str(held)])
    assert not_rm.returncode == 1 and "not a reward model" in not_rm.stderr


def test_llama2_combination_picks_the_safety_score_when_it_matters() -> None:
    assert combine_rewards(helpful=2.0, safety=3.0) == 2.0  # safe enough: helpfulness
    assert combine_rewards(helpful=2.0, safety=-2.0) == -2.0  # sigmoid(-2) = 0.12 < 0.15
    assert combine_rewards(helpful=2.0, safety=3.0, safety_prompt=True) == 3.0


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_raises_held_out_preference_and_the_chosen_likelihood(
        tiny_chat_gguf: Path, pairs: tuple[Path, Path], tmp_path: Path, lora: bool) -> None:
    train, held = pairs
    out = tmp_path / "dpo"
    done = run(CLI + ["train", "dpo", "--model", str(tiny_chat_gguf), "--data", str(train),
                      "--val-data", str(held), "--out", str(out), "--steps", "15",
                      "--lr", "1e-2" if lora else "1e-3", "--precision", "float32",
                      "--eval-every", "5", "--beta", "0.1"] + (["--lora"] if lora else []))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    # at the start the policy is the reference: every margin 0, the loss log 2 plus the NLL term
    assert summary["eval_margin_before"] == pytest.approx(0.0, abs=1e-4)
    assert summary["eval_dpo_before"] == pytest.approx(0.693147, abs=1e-4)
    assert summary["eval_accuracy_after"] >= 0.9
    assert summary["eval_margin_after"] > 0.5
    assert summary["eval_nll_after"] < summary["eval_nll_before"]
    # the tuned model gives the chosen answer more of its probability than the base model did
    tuned, base = llamaherd.load(out, dtype="float32"), llamaherd.load(tiny_chat_gguf,
                                                                        dtype="float32")
    prompt = tuned.chat_format.render([{"role": "user", "content": "What is 3 plus 5?"}])
    ids = tuned.tokenizer.encode_prompt(prompt)
    answer = tuned.tokenizer.encode("3 plus 5 is 8.")

    def logp(llm) -> float:
        logits = llm.logits(ids + answer)[len(ids) - 1:-1]
        return float(torch.log_softmax(logits.float(), -1)[
            torch.arange(len(answer)), torch.tensor(answer)].sum())

    assert logp(tuned) > logp(base) + 1.0


def test_reward_model_on_two_processes_matches_one(tiny_chat_gguf: Path,
                                                   pairs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    train, held = pairs
    common = ["--model", str(tiny_chat_gguf), "--data", str(train), "--val-data", str(held),
              "--steps", "4", "--lr", "1e-3", "--precision", "float32", "--threads", "1"]
    one = run(CLI + ["train", "reward", *common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "llamaherd.cli", "train", "reward", *common,
               "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]

    def losses(out: str) -> list[float]:
        return [json.loads(line)["loss"] for line in
                (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    assert losses("two") == pytest.approx(losses("one"), rel=1e-4)
