"""Online post-training: the engine refreshed from a policy computes the policy's logits, and
GRPO and PPO runs on a tiny model raise the reward a verifier gives their answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaherd
import llamaherd.train
from llamaherd.train.rollout import PolicyEngine
from tests.support.models import TINY, make_tiny_model


def lowercase(row: dict, reply: str) -> float:
    """The tests' verifier: 1 when the reply starts with a lowercase letter (the tiny model's
    greedy answers do not; a good share of its samples do)."""
    return 1.0 if reply[:1].islower() else 0.0


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prompts")
    rows = [{"prompt": f"Say something about the number {i}."} for i in range(24)]
    train, held = folder / "train.jsonl", folder / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    return train, held


def test_refreshed_engine_computes_the_updated_policy(smollm) -> None:
    args = TINY.replace(vocab_size=49152, max_seq_len=512)
    policy = make_tiny_model(args, logit_scale=8.0)
    engine = PolicyEngine(args, smollm)
    engine.refresh(policy)
    ids = list(range(300, 340))

    def agree() -> float:
        packed = engine.llm.logits(ids)
        with torch.no_grad():
            exact = policy(torch.tensor([ids]))[0]
        assert (packed.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.95
        return float(torch.nn.functional.cosine_similarity(packed, exact, dim=-1).min())

    assert agree() > 0.999
    assert "GGUFLinear" in repr(engine.llm.model.layers[0].attention)  # on the packed kernels
    with torch.no_grad():  # an update: the engine is stale until refreshed
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stale = engine.llm.logits(ids)
    with torch.no_grad():
        exact = policy(torch.tensor([ids]))[0]
    assert float(torch.nn.functional.cosine_similarity(stale, exact, dim=-1).min()) < 0.99
    assert engine.refresh(policy) > 0
    assert agree() > 0.999


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_raises_the_verifiers_reward(sampler_gguf: Path, prompts: tuple[Path, Path],
                                          tmp_path: Path, lora: bool) -> None:
    train, held = prompts
    out = llamaherd.train.grpo(
        model=str(sampler_gguf), data=str(train), val_data=str(held), out=str(tmp_path / "g"),
        verifier="tests.train.test_online:lowercase", steps=12, batch_size=4, group_size=4,
        max_new_tokens=8, lr=3e-2 if lora else 1e-2, lora=lora, lora_rank=8,
        precision="float32", eval_every=6, kl_coef=0.01)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward", "refresh_s", "rollout_s", "loss"} <= set(r) for r in rows)
    assert sum(r["reward"] for r in rows[-3:]) / 3 >= 0.75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_before"] <= 0.5 and summary["eval_reward_after"] == 1.0
    assert summary["refresh_s_mean"] > 0
    # the output is a model that loads and runs
    tuned = llamaherd.load(out, dtype="float32")
    assert tuned.generate("hi", max_new_tokens=2)[0].token_ids


def test_ppo_from_the_cli_trains_a_value_head_and_exports_the_policy(
        sampler_gguf: Path, prompts: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = prompts
    out = tmp_path / "p"
    done = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "train", "ppo", "--model", str(sampler_gguf),
         "--data", str(train), "--val-data", str(held), "--out", str(out),
         "--verifier", "tests.train.test_online:lowercase", "--steps", "12", "--batch-size",
         "4", "--group-size", "4", "--max-new-tokens", "8", "--lr", "1e-2",
         "--precision", "float32", "--eval-every", "6"],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["reward"] for r in rows[-3:]) / 3 >= 0.75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_before"] <= 0.5 and summary["eval_reward_after"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # the value head stays behind
    assert llamaherd.load(out, dtype="float32").args.n_layers == 2
