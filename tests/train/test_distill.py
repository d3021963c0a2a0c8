"""Distillation end to end on a tiny model with the default model's vocabulary: a briefly
fine-tuned copy of it (a Hugging Face directory) teaches the model pruned to one layer, through
the Python API and the CLI. The held-out distillation loss falls, the teacher's top-k are cached
and reused, and the output directory loads as a one-layer model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import llamaherd
import llamaherd.train
from llamaherd.train.config import TrainConfig
from llamaherd.train.teacher import CACHE, CACHE_INFO

CLI = [sys.executable, "-m", "llamaherd.cli", "train", "distill"]


def chats(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 9 + 1, (i * 7) % 8 + 1
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("distill-data")
    train, held = folder / "train.jsonl", folder / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chats(32)))
    held.write_text("".join(json.dumps(r) + "\n" for r in chats(8, 100)))
    return train, held


@pytest.fixture(scope="module")
def teacher(tiny_chat_gguf: Path, data: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a few SFT steps: it knows what the untuned student does not."""
    return llamaherd.train.sft(model=str(tiny_chat_gguf), data=str(data[0]), steps=10, lr=3e-3,
                               precision="float32", val_fraction=0.0,
                               out=str(tmp_path_factory.mktemp("teacher")))


def test_settings_are_checked() -> None:
    for bad in ({"kd_ratio": 1.5}, {"kd_temperature": 0.0}, {"kd_top_k": 0},
                {"prune_keep": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig.make(**bad)


def test_a_pruned_student_learns_its_teacher_and_the_cache_is_reused(
        tiny_chat_gguf: Path, teacher: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = data
    out = tmp_path / "student"
    llamaherd.train.distill(model=str(tiny_chat_gguf), teacher=str(teacher), data=str(train),
                            val_data=str(held),
                            out=str(out), steps=16, lr=3e-3, precision="float32",
                            eval_every=8, prune_keep=1, kd_temperature=2.0, kd_ratio=1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_kd_after"] < 0.5 * summary["eval_kd_before"]
    # with no NLL term at all, the teacher alone taught the student the held-out answers
    assert summary["eval_nll_after"] < 0.8 * summary["eval_nll_before"]

    info = json.loads((out / CACHE_INFO).read_text())
    assert info["teacher"] == str(teacher) and info["k"] == 32
    cache = load_file(out / CACHE)
    assert cache["ids"].shape == cache["logits"].shape == (info["positions"], 32)
    distinct = {json.dumps(r) for r in chats(32) + chats(8, 100)}
    assert cache["digests"].shape == (len(distinct),)  # each distinct example once
    written = (out / CACHE).stat().st_mtime_ns

    # the output directory is a one-layer model with the teacher's vocabulary
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    student = llamaherd.load(out, dtype="float32")
    assert student.args.n_layers == 1 and len(student.model.layers) == 1
    assert student.args.vocab_size == 49152
    assert student.generate("Hi", max_new_tokens=3)[0].text is not None

    # again from the command line, into the same directory, at another ratio and temperature
    # (the cache holds raw logits): the cache is read, not recomputed
    done = subprocess.run(
        CLI + ["--model", str(tiny_chat_gguf), "--teacher", str(teacher),
               "--data", str(train), "--val-data", str(held), "--out", str(out),
               "--steps", "2", "--precision", "float32", "--kd-top-k", "32",
               "--kd-ratio", "0.5", "--kd-temperature", "1", "--prune-keep", "1"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"teacher top-32 of 40 examples: reused {out / CACHE}" in done.stdout + done.stderr
    assert (out / CACHE).stat().st_mtime_ns == written
    assert json.loads((out / "train_config.json").read_text())["kd_ratio"] == 0.5
    assert llamaherd.load(out, dtype="float32").args.n_layers == 1
