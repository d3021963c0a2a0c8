"""Rounds of rejection sampling, SFT and DPO from the command line: each round's files, its
model drawing the next round's samples, and the held-out reward rising."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_two_rounds(sampler_gguf: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"Say something about the number {i}."} for i in range(20)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "train", "rounds", "--model", str(sampler_gguf),
         "--data", str(train), "--val-data", str(held), "--out", str(out),
         "--verifier", "tests.train.test_online:lowercase", "--rounds", "2", "-k", "4",
         "--max-new-tokens", "6", "--steps", "6", "--batch-size", "4", "--lr", "1e-2",
         "--dpo-lr", "1e-3", "--precision", "float32"],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in report] == [0, 1, 2]
    for r in (1, 2):
        folder = out / f"round-{r}"
        for name in ("samples.jsonl", "sft.jsonl", "pairs.jsonl", "sft/summary.json"):
            assert (folder / name).exists(), name
        kept = [json.loads(line) for line in (folder / "sft.jsonl").read_text().splitlines()]
        assert kept and all(k["messages"][-1]["content"][:1].islower() for k in kept)
    # round 2 sampled from round 1's final model, and did better on its own samples
    assert report[1]["model"].startswith(str(out / "round-1"))
    assert report[2]["sampling"]["mean_reward"] > report[1]["sampling"]["mean_reward"]
    assert report[2]["held_out_reward"] > report[0]["held_out_reward"]
