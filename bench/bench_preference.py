"""Preference training and rejection sampling: llamaherd against TRL and transformers side by side.

The preference section of the training benchmarks (bench/bench_train.py has SFT). On the default
model, one run, each side in its own process (so that its peak RSS is its own):

- dpo: DPO on the same preference pairs in the same order (batch 8, lr 5e-7, beta 0.1, cosine
  without warm-up, float32, no NLL term on either side) against TRL's DPOTrainer. llamaherd's
  time counts its reference pass (log-probabilities computed once up front) with the training.
- reward: reward-model training on the same pairs against TRL's RewardTrainer.
- grpo: one GRPO iteration (4 ASDiv prompts x 8 answers of up to 64 tokens, judged by the math
  verifier, then one update; llamaherd also refreshes its engine) against TRL's GRPOTrainer
  (transformers generate), without a KL term on either side.
- sample: rejection sampling's generation: K answers to each of P prompts (64 new tokens each,
  sampled at temperature 0.8) through llamaherd's engine on the packed GGUF weights, against
  transformers' generate (float32, num_return_sequences=K) on the same prompts.

Pairs come from chatterbot-corpus: a question, its own answer (chosen) and another
conversation's answer (rejected). Figures: pair tokens/s (prompt plus both answers, as each
trainer counts its input), peak RSS, the loss curves, samples/s. Writes
bench/results/preference.json.

    .venv/bin/python bench/bench_preference.py [--steps 20] [--sections dpo,reward,sample]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_train import RESULTS, WORK, cpu_name

SEED = 0
LR = {"dpo": 5e-7, "reward": 1e-5}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(model: str, n: int) -> tuple[Path, Path, Path]:
    """(our pairs JSONL, TRL's pairs JSONL in our trainer's epoch-0 order, the HF directory)."""
    import torch

    from llamaherd import datasets
    from llamaherd.convert import convert

    WORK.mkdir(parents=True, exist_ok=True)
    hf = WORK / "hf"
    if not (hf / "model.safetensors").exists():
        convert(model, hf, "hf")
    chats = [r["messages"] for r in datasets.rows("chatterbot-english", quiet=True)]
    rng = random.Random(SEED)
    rows = []
    for i, messages in enumerate(chats[:n]):
        other = chats[rng.randrange(len(chats))]
        if other[1]["content"] == messages[1]["content"]:
            other = chats[(i + 1) % len(chats)]
        rows.append({"prompt": messages[:1], "chosen": [messages[1]], "rejected": [other[1]]})
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED * 1_000_003))
    ours, theirs = WORK / "pairs.jsonl", WORK / "pairs-trl.jsonl"
    ours.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs.write_text("".join(json.dumps(rows[i]) + "\n" for i in order.tolist()))
    return ours, theirs, hf


def child_llamaherd(a: argparse.Namespace) -> dict:
    import torch

    import llamaherd.train
    from llamaherd.train.config import TrainConfig

    torch.set_num_threads(a.threads)
    out = WORK / f"llamaherd-{a.section}"
    config = TrainConfig.make(
        model=a.model, data=a.data, out=str(out), steps=a.steps, batch_size=8, max_len=512,
        lr=LR[a.section], warmup_steps=0, precision="float32", val_fraction=0.0, seed=SEED,
        threads=a.threads, beta=0.1, nll=0.0, margin_scale="none")
    (llamaherd.train.dpo if a.section == "dpo" else llamaherd.train.reward)(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
            "tokens": sum(r["tokens"] for r in rows),
            "seconds": rows[-1]["elapsed_s"] + summary.get("reference_s", 0.0),
            "reference_s": summary.get("reference_s", 0.0), "peak_rss_mb": _peak_rss_mb()}


def child_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    torch.set_num_threads(a.threads)
    data = load_dataset("json", data_files=a.data, split="train").select(range(a.steps * 8))
    tokenizer = AutoTokenizer.from_pretrained(a.hf)
    losses: list[float] = []
    norms: list[float] = []
    tokens = [0]

    class Log(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                norms.append(float(logs.get("grad_norm", float("nan"))))

    common = {"output_dir": str(WORK / f"trl-{a.section}"), "per_device_train_batch_size": 8,
              "gradient_accumulation_steps": 1, "learning_rate": LR[a.section],
              "lr_scheduler_type": "cosine", "warmup_steps": 0, "max_steps": a.steps,
              "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True,
              "seed": SEED, "dataloader_num_workers": 0, "weight_decay": 0.0,
              "max_grad_norm": 1.0, "optim": "adamw_torch", "max_length": 512}
    if a.section == "dpo":
        model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
        config = DPOConfig(beta=0.1, loss_type=["sigmoid"], **common)
        base = DPOTrainer
    else:
        model = AutoModelForSequenceClassification.from_pretrained(a.hf, num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        config = RewardConfig(**common)
        base = RewardTrainer

    class InOrder(base):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      callbacks=[Log()])
    for row in trainer.train_dataset:  # the tokens each side of a pair feeds the model
        prompt = len(row["prompt_ids"]) if "prompt_ids" in row else 0  # DPO: the answers apart
        tokens[0] += 2 * prompt + len(row["chosen_ids"]) + len(row["rejected_ids"])
    t0 = time.perf_counter()
    trainer.train()
    return {"losses": losses, "grad_norms": norms, "tokens": tokens[0],
            "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}


def sample_prompts(p: int) -> list[list[dict]]:
    from llamaherd import datasets

    chats = datasets.rows("chatterbot-english", quiet=True)
    return [r["messages"][:1] for r in chats[-p:]]


def child_sample_llamaherd(a: argparse.Namespace) -> dict:
    import llamaherd
    from llamaherd.chat import build_prompt

    llm = llamaherd.load(a.model)  # the packed GGUF weights
    prompts = [build_prompt(llm.chat_format, m) for m in sample_prompts(a.prompts)]
    llm.generate(prompts[:1], n=2, max_new_tokens=4, temperature=0.8, seed=1)  # warm-up
    t0 = time.perf_counter()
    done = llm.generate(prompts, n=a.k, max_new_tokens=a.new_tokens, min_tokens=a.new_tokens,
                        temperature=0.8, top_p=1.0, seed=SEED)
    seconds = time.perf_counter() - t0
    return {"samples": len(done), "tokens": sum(len(c.token_ids) for c in done),
            "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def child_sample_transformers(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.hf)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
    torch.manual_seed(SEED)
    samples = tokens = 0
    seconds = 0.0
    for messages in sample_prompts(a.prompts):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
                                 max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 num_return_sequences=a.k, pad_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - t0
        samples += out.shape[0]
        tokens += out.shape[0] * (out.shape[1] - ids["input_ids"].shape[1])
    return {"samples": samples, "tokens": tokens, "seconds": seconds,
            "peak_rss_mb": _peak_rss_mb()}


GRPO = {"steps": 3, "prompts": 4, "group": 8, "new_tokens": 64, "lr": 1e-6}


def grpo_prompts(path: Path) -> Path:
    """ASDiv problems as prompt rows with their answers (the math verifier's input)."""
    from llamaherd import datasets

    rows = datasets.rows("asdiv", quiet=True)[:GRPO["steps"] * GRPO["prompts"]]
    datasets.write_jsonl(({"prompt": r["prompt"], "answer": r["answer"]} for r in rows), path)
    return path


def child_grpo_llamaherd(a: argparse.Namespace) -> dict:
    import torch

    import llamaherd.train

    torch.set_num_threads(a.threads)
    out = llamaherd.train.grpo(
        model=a.model, data=a.data, out=str(WORK / "llamaherd-grpo"), steps=GRPO["steps"],
        batch_size=GRPO["prompts"], group_size=GRPO["group"], max_new_tokens=GRPO["new_tokens"],
        temperature=1.0, lr=GRPO["lr"], kl_coef=0.0, verifier="math", precision="float32",
        val_fraction=0.0, warmup_steps=0, seed=SEED, threads=a.threads)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": summary["train_s"], "steps": len(rows),
            "rollout_s": summary["rollout_s"], "refresh_s_mean": summary["refresh_s_mean"],
            "rewards": [r["reward"] for r in rows], "peak_rss_mb": _peak_rss_mb()}


def child_grpo_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    from llamaherd.train.verifiers import math_reward

    torch.set_num_threads(a.threads)
    data = load_dataset("json", data_files=a.data, split="train")
    rewards: list[float] = []

    def reward(completions, answer, **kwargs):
        scores = [math_reward({"answer": gold}, c[0]["content"] if isinstance(c, list) else c)
                  for c, gold in zip(completions, answer, strict=True)]
        rewards.extend(scores)
        return scores

    config = GRPOConfig(
        output_dir=str(WORK / "trl-grpo"),
        per_device_train_batch_size=GRPO["prompts"] * GRPO["group"],
        num_generations=GRPO["group"], max_completion_length=GRPO["new_tokens"], beta=0.0,
        temperature=1.0, learning_rate=GRPO["lr"], max_steps=GRPO["steps"], logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=SEED, dataloader_num_workers=0,
        lr_scheduler_type="cosine", warmup_steps=0)
    trainer = GRPOTrainer(model=a.hf, reward_funcs=[reward], args=config, train_dataset=data)
    t0 = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t0, "steps": GRPO["steps"],
            "mean_reward": sum(rewards) / max(len(rewards), 1), "peak_rss_mb": _peak_rss_mb()}


CHILDREN = {"llamaherd": child_llamaherd, "trl": child_trl,
            "sample-llamaherd": child_sample_llamaherd,
            "sample-transformers": child_sample_transformers,
            "grpo-llamaherd": child_grpo_llamaherd, "grpo-trl": child_grpo_trl}


def run_child(name: str, a: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--model", a.model, "--steps",
           str(a.steps), "--threads", str(a.threads), "--prompts", str(a.prompts), "-k",
           str(a.k), "--new-tokens", str(a.new_tokens)]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", default="dpo,reward,sample,grpo")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--child")
    ap.add_argument("--section")
    ap.add_argument("--data")
    ap.add_argument("--hf")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return
    ours, theirs, hf = prepare(a.model, a.steps * 8)
    results: dict[str, dict] = {}
    for section in a.sections.split(","):
        if section == "grpo":
            prompts = str(grpo_prompts(WORK / "grpo-prompts.jsonl"))
            row = {"llamaherd": run_child("grpo-llamaherd", a, data=prompts, hf=str(hf)),
                   "trl": run_child("grpo-trl", a, data=prompts, hf=str(hf))}
            for r in row.values():
                r["seconds_per_iteration"] = r["seconds"] / r["steps"]
            row["speedup"] = (row["trl"]["seconds_per_iteration"]
                              / row["llamaherd"]["seconds_per_iteration"])
        elif section == "sample":
            row = {"llamaherd": run_child("sample-llamaherd", a, hf=str(hf)),
                   "transformers": run_child("sample-transformers", a, hf=str(hf))}
            for r in row.values():
                r["samples_per_s"] = r["samples"] / r["seconds"]
            row["speedup"] = (row["llamaherd"]["samples_per_s"]
                              / row["transformers"]["samples_per_s"])
        else:
            row = {"llamaherd": run_child("llamaherd", a, section=section, data=str(ours),
                                          hf=str(hf)),
                   "trl": run_child("trl", a, section=section, data=str(theirs), hf=str(hf))}
            for r in row.values():
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
            row["speedup"] = row["llamaherd"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
            row["rss_ratio"] = row["llamaherd"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
        results[section] = row
        print(section, json.dumps(row)[:600], flush=True)
    report = {"cpu": cpu_name(), "threads": a.threads, "steps": a.steps, "prompts": a.prompts,
              "k": a.k, "new_tokens": a.new_tokens, "results": results}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "preference.json"
    if path.exists():  # sections run before and not now keep their figures
        earlier = json.loads(path.read_text()).get("results", {})
        report["results"] = {**earlier, **results}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['cpu']}, {a.threads} threads")
    for section, row in results.items():
        if section == "grpo":
            print(f"grpo: {GRPO['prompts']} prompts x {GRPO['group']} answers x "
                  f"{GRPO['new_tokens']} tokens a step: llamaherd "
                  f"{row['llamaherd']['seconds_per_iteration']:.1f} s, TRL "
                  f"{row['trl']['seconds_per_iteration']:.1f} s ({row['speedup']:.1f}x)")
        elif section == "sample":
            print(f"sample: llamaherd {row['llamaherd']['samples_per_s']:.2f} samples/s, "
                  f"transformers {row['transformers']['samples_per_s']:.2f} "
                  f"({row['speedup']:.1f}x)")
        else:
            us, them = row["llamaherd"], row["trl"]
            print(f"{section}: llamaherd {us['tokens_per_s']:.1f} tok/s "
                  f"{us['peak_rss_mb']:.0f} MB, TRL {them['tokens_per_s']:.1f} tok/s "
                  f"{them['peak_rss_mb']:.0f} MB: {row['speedup']:.2f}x, RSS "
                  f"{row['rss_ratio']:.2f}x; final loss {us['losses'][-1]:.4f} / "
                  f"{them['losses'][-1]:.4f}")
    print(f"wrote {RESULTS / 'preference.json'}")


if __name__ == "__main__":
    main()
