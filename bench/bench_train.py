"""Supervised fine-tuning speed and memory: llamaherd against TRL's SFTTrainer (+ peft) side by side.

Both train the default model (TRL on the Hugging Face directory `llamaherd convert` writes) on the
same tokenized conversations of chatterbot-corpus (the same token ids and loss masks: TRL gets
them pre-tokenized), in the same order, with the same batch, learning rate, schedule (cosine, no
warm-up), AdamW settings and gradient clipping, for the same number of steps; each run in its
own process, so that its peak RSS is its own.

    .venv/bin/python bench/bench_train.py [--steps 30] [--modes full-fp32,full-bf16,lora-fp32]

Figures: trained tokens/s (every non-padding token of the batch, as TRL's throughput counts them;
the time of the training loop, the model's load excluded), peak RSS, the loss of each step (the two
curves must agree within the stated tolerance for the comparison to hold), and the model FLOP/s
(6 x parameters per token, 4 x for LoRA's frozen weights) as a share of this CPU's measured matmul
peak in that precision. Writes bench/results/train.json and train.png. The preference and
online methods (DPO, reward models, rejection sampling, GRPO) are measured by
bench/bench_preference.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = RESULTS / "train-work"
MODES = {"full-fp32": (False, "float32"), "full-bf16": (False, "bf16"), "lora-fp32": (True, "float32")}
LR = {False: 2e-5, True: 2e-4}
TOLERANCE = {False: 0.02, True: 0.05}  # relative per-step loss agreement (LoRA: random A init)
SEED = 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def prepare(model: str, max_len: int, n: int) -> tuple[Path, Path, Path]:
    """(our JSONL of the first n conversations in training order, TRL's pre-tokenized JSONL of
    the same, the HF directory of the model)."""
    import torch

    from llamaherd import datasets
    from llamaherd.api import open_checkpoint
    from llamaherd.chat import chat_format
    from llamaherd.convert import convert
    from llamaherd.train.data import encode_row

    WORK.mkdir(parents=True, exist_ok=True)
    hf = WORK / "hf"
    if not (hf / "model.safetensors").exists():
        convert(model, hf, "hf")
    _, tokenizer = open_checkpoint(model, packed=True)
    fmt = chat_format(tokenizer)
    rows, encoded = [], []
    for row in datasets.rows("chatterbot-english", quiet=True):
        ex = encode_row(row, fmt, tokenizer)
        tokens, labels = ex.tokens[:max_len], ex.labels[:max_len]
        if any(labels[1:]):  # what llamaherd keeps too (overlong="truncate")
            rows.append(row)
            encoded.append({"input_ids": tokens,
                            "labels": [t if k else -100 for t, k in zip(tokens, labels)]})
    # llamaherd's trainer draws epoch 0 in this order (Trainer.order); TRL reads it sequentially
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED * 1_000_003))
    ours, theirs = WORK / "chats.jsonl", WORK / "tokenized.jsonl"
    ours.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs.write_text("".join(json.dumps(encoded[i]) + "\n" for i in order[:n].tolist()))
    return ours, theirs, hf


def child_llamaherd(args: argparse.Namespace) -> dict:
    import torch

    import llamaherd.train
    from llamaherd.train.config import TrainConfig

    lora, precision = MODES[args.mode]
    torch.set_num_threads(args.threads)
    out = WORK / f"llamaherd-{args.mode}"
    config = TrainConfig.make(
        model=args.model, data=args.data, out=str(out), steps=args.steps,
        batch_size=args.batch_size, max_len=args.max_len, lr=LR[lora], warmup_steps=0,
        precision=precision, lora=lora, lora_rank=16, lora_alpha=32.0, val_fraction=0.0,
        seed=SEED, threads=args.threads)
    llamaherd.train.sft(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in rows)
    return {"losses": [r["loss"] for r in rows], "tokens": tokens,
            "seconds": rows[-1]["elapsed_s"], "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    lora, precision = MODES[args.mode]
    torch.set_num_threads(args.threads)
    data = load_dataset("json", data_files=args.data, split="train")
    data = data.select(range(args.steps * args.batch_size))
    tokens = sum(len(ids) for ids in data["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    config = SFTConfig(
        output_dir=str(WORK / f"trl-{args.mode}"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=LR[lora], lr_scheduler_type="cosine",
        warmup_steps=0, max_steps=args.steps, logging_steps=1, save_strategy="no",
        report_to="none", bf16=precision == "bf16", use_cpu=True, max_length=args.max_len,
        seed=SEED, dataloader_num_workers=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", completion_only_loss=False)
    trainer = InOrder(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Losses()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"losses": losses, "tokens": tokens, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def matmul_peak(threads: int, dtype: str) -> float:
    """GFLOP/s of a large matmul in `dtype` on `threads` threads: this CPU's practical peak."""
    import torch

    torch.set_num_threads(threads)
    t = {"float32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(2048, 2048, dtype=t), torch.randn(2048, 2048, dtype=t)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def run_child(engine: str, mode: str, args: argparse.Namespace, data: Path, hf: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--mode", mode, "--data", str(data),
           "--hf", str(hf), "--model", args.model, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} {mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child")
    ap.add_argument("--mode")
    ap.add_argument("--data")
    ap.add_argument("--hf")
    a = ap.parse_args()
    if a.child:
        print(json.dumps((child_llamaherd if a.child == "llamaherd" else child_trl)(a)))
        return
    ours, theirs, hf = prepare(a.model, a.max_len, a.steps * a.batch_size)
    peaks = {p: matmul_peak(a.threads, p) for p in ("float32", "bf16")}
    results = {}
    params = 134_515_008  # SmolLM2-135M, embeddings tied
    for mode in a.modes.split(","):
        lora, precision = MODES[mode]
        row = {}
        for engine, data in (("llamaherd", ours), ("trl", theirs)):
            print(f"{mode}: {engine} ...", flush=True)
            r = run_child(engine, mode, a, data, hf)
            flops = (4 if lora else 6) * params * r["tokens_per_s"]
            r["peak_share"] = flops / 1e9 / peaks[precision]
            row[engine] = r
        ours_l, trl_l = row["llamaherd"]["losses"], row["trl"]["losses"]
        worst = max(abs(x - y) / abs(y) for x, y in zip(ours_l, trl_l, strict=True))
        row["max_loss_gap"] = worst
        row["losses_agree"] = worst <= TOLERANCE[lora]
        row["speedup"] = row["llamaherd"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
        row["rss_ratio"] = row["llamaherd"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
        results[mode] = row
    report = {"cpu": cpu_name(), "threads": a.threads, "steps": a.steps,
              "batch_size": a.batch_size, "max_len": a.max_len, "matmul_peak_gflops": peaks,
              "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{cpu_name()}, {a.threads} threads, {a.steps} steps of {a.batch_size} conversations")
    print(f"{'mode':10} {'engine':10} {'tok/s':>8} {'peak RSS':>9} {'final loss':>10} "
          f"{'of peak':>8}")
    for mode, row in results.items():
        for engine in ("llamaherd", "trl"):
            r = row[engine]
            print(f"{mode:10} {engine:10} {r['tokens_per_s']:8.1f} {r['peak_rss_mb']:7.0f}MB "
                  f"{r['losses'][-1]:10.4f} {r['peak_share']:7.1%}")
        print(f"{'':10} speedup {row['speedup']:.2f}x, RSS {row['rss_ratio']:.2f}x, losses "
              f"within {row['max_loss_gap']:.2%} ({'agree' if row['losses_agree'] else 'DIFFER'})")
    plot(results)
    print(f"wrote {RESULTS / 'train.json'} and train.png")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), dpi=110)
    for ax, (mode, row) in zip(axes if len(results) > 1 else [axes], results.items()):
        for engine, style in (("llamaherd", "-"), ("trl", "--")):
            r = row[engine]
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], style,
                    label=f"{engine} ({r['tokens_per_s']:.0f} tok/s)")
        ax.set_title(mode)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "train.png")


if __name__ == "__main__":
    main()
