"""Supervised fine-tuning end to end on a tiny model with the default model's vocabulary: the
Python API and the CLI, what the output directory holds, resume after `kill -9`, and the same run
on two processes under torchrun (FSDP2 over gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file

import llamaherd
import llamaherd.convert
import llamaherd.train
from llamaherd.train.lora import LoRAConfig, apply_lora
from llamaherd.train.trainer import lr_lambda, split
from tests.support.server import llamaherd_server

CLI = [sys.executable, "-m", "llamaherd.cli", "train", "sft"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "llamaherd.cli", "train", "sft"]
QUESTIONS = [("What is {a} plus {b}?", "{a} plus {b} is {s}.")]


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 short arithmetic conversations."""
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = []
    for i in range(64):
        a, b = i % 9 + 1, (i * 7) % 8 + 1
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_schedule_and_batch_split() -> None:
    f = lr_lambda(total=10, warmup=2, min_ratio=0.1)
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.55, 0.1]
    assert [list(p) for p in split(list(range(7)), 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(p) for p in split([1], 2)] == [[1], []]


def test_full_fine_tuning_lowers_validation_loss_and_writes_a_loadable_model(
        tiny_chat_gguf: Path, chats: Path, tmp_path: Path) -> None:
    out = llamaherd.train.sft(model=str(tiny_chat_gguf), data=str(chats), out=str(tmp_path / "o"),
                              steps=30, lr=1e-3, precision="float32", eval_every=10)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the output directory is a model: it loads, and differs from where it started
    tuned, base = llamaherd.load(out, dtype="float32"), llamaherd.load(tiny_chat_gguf,
                                                                        dtype="float32")
    assert tuned.tokenizer.encode("What is 2 plus 3?") == base.tokenizer.encode("What is 2 plus 3?")
    assert tuned.chat_format.render([{"role": "user", "content": "hi"}]) == \
        base.chat_format.render([{"role": "user", "content": "hi"}])
    ids = tuned.tokenizer.encode("What is 2 plus 3?")
    assert (tuned.logits(ids) - base.logits(ids)).abs().max() > 0.1
    # it serves as it is
    with llamaherd_server(str(out), "--max-seqs", "1", "--ctx-size", "256", "--model-id",
                          "tuned", threads=2) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        reply = client.chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": "What is 2 plus 3?"}],
            max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    # and converts to a packed GGUF that runs on the kernels
    gguf = llamaherd.convert.convert(out, tmp_path / "tuned.gguf", "gguf", gguf_type="Q8_0")
    packed = llamaherd.load(gguf)
    cos = torch.nn.functional.cosine_similarity(packed.logits(ids)[-1], tuned.logits(ids)[-1],
                                                dim=0)
    assert cos > 0.99


def test_lora_output_is_the_base_plus_its_merged_adapters(tiny_chat_gguf: Path, chats: Path,
                                                          tmp_path: Path) -> None:
    out = llamaherd.train.sft(model=str(tiny_chat_gguf), data=str(chats), out=str(tmp_path / "o"),
                              steps=12, lora=True, lora_rank=4, lr=1e-2, precision="float32")
    assert json.loads((out / "adapter_config.json").read_text())["rank"] == 4
    base = llamaherd.load(tiny_chat_gguf, dtype="float32")
    apply_lora(base.model, LoRAConfig(rank=4, alpha=32.0))
    base.model.load_state_dict(load_file(out / "adapter.safetensors"), strict=False)
    tuned = llamaherd.load(out, dtype="float32")
    tokens = torch.tensor([base.tokenizer.encode("What is 4 plus 4?")])
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(tokens), base.model(tokens), atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in tuned.model.state_dict())


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(tiny_chat_gguf: Path, chats: Path,
                                                               tmp_path: Path) -> None:
    args = ["--model", str(tiny_chat_gguf), "--data", str(chats), "--steps", "40",
            "--save-every", "10", "--lr", "1e-3", "--precision", "float32", "--threads", "1"]
    whole = tmp_path / "whole"
    done = run([*CLI, *args, "--out", str(whole)])
    assert done.returncode == 0, done.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*CLI, *args, "--out", str(cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:  # kill it once the step-10 checkpoint is in place and it is past step 12
        while time.monotonic() < deadline and proc.poll() is None:
            if (cut / "checkpoints" / "step-000010").is_dir() and \
                    (cut / "metrics.jsonl").exists() and len(metrics(cut)) >= 12:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut / "model.safetensors").exists()
    resumed = run([*CLI, *args, "--out", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step-000010" in resumed.stdout
    want, got = metrics(whole), metrics(cut)
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit for bit
    assert [r.get("eval_loss") for r in got] == [r.get("eval_loss") for r in want]


def test_two_processes_train_what_one_does_and_resume_on_another_count(
        tiny_chat_gguf: Path, chats: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_chat_gguf), "--data", str(chats), "--steps", "20",
            "--batch-size", "8", "--lr", "1e-3", "--precision", "float32", "--save-every", "10"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = run([*CLI, *args, "--out", str(one), "--threads", "1"])
    assert single.returncode == 0, single.stderr[-2000:]
    double = run([*TORCHRUN, *args, "--out", str(two)], timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])
    # the 2-process run's step-10 checkpoint, resumed on one process, goes on as before
    (two / "checkpoints" / "step-000020").rename(two / "checkpoints" / "gone")
    (two / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b[:10]))
    again = run([*CLI, *args, "--out", str(two), "--resume", "--threads", "1"])
    assert again.returncode == 0, again.stderr[-2000:]
    for x, y in zip(a, metrics(two)):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])


def test_bad_input_is_one_line(tiny_chat_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    r = run([*CLI, "--model", str(tiny_chat_gguf), "--data", str(bad), "--out",
             str(tmp_path / "o")])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}:1: no assistant turn to train on"
    r = run([*CLI, "--data", str(bad)])
    assert r.returncode == 2 and "--data and --out are required" in r.stderr


@pytest.mark.parametrize("variant", [{"grad_accum": 4}, {"gradient_checkpointing": True},
                                     {"precision": "bf16"}])
def test_micro_steps_checkpointing_and_bf16_train_the_same_model(
        tiny_chat_gguf: Path, chats: Path, tmp_path: Path, variant: dict) -> None:
    """Splitting each step's batch in micro-steps and recomputing activations change nothing but
    the order of sums; bf16 autocast follows the float32 curve closely."""
    common = {"model": str(tiny_chat_gguf), "data": str(chats), "steps": 8, "lr": 1e-3,
              "precision": "float32", "threads": 2}
    plain = metrics(llamaherd.train.sft(out=str(tmp_path / "plain"), **common))
    other = metrics(llamaherd.train.sft(out=str(tmp_path / "other"), **{**common, **variant}))
    tol = 0.02 if variant.get("precision") == "bf16" else 1e-4
    for a, b in zip(plain, other, strict=True):
        assert abs(a["loss"] - b["loss"]) <= tol * abs(a["loss"]), (variant, a["step"])


def test_a_config_file_sets_what_flags_do_not(tiny_chat_gguf: Path, chats: Path,
                                              tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tiny_chat_gguf}"\ndata = "{chats}"\nsteps = 3\nlr = 0.001\n'
                      f'lora = true\nlora_rank = 2\nprecision = "float32"\n')
    r = run([*CLI, "--config", str(config), "--out", str(tmp_path / "o"), "--steps", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert (saved["steps"], saved["lora"], saved["lora_rank"]) == (2, True, 2)  # flag wins
    assert len(metrics(tmp_path / "o")) == 2
    config.write_text("stepz = 3\n")
    r = run([*CLI, "--config", str(config), "--data", str(chats), "--out", str(tmp_path / "p")])
    assert r.returncode == 1 and "unknown setting 'stepz'" in r.stderr
