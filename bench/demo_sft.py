"""Fine-tuning demonstration: SmolLM2-135M-Instruct on chatterbot-corpus's English conversations.

    .venv/bin/python bench/demo_sft.py [--epochs 1] [--lora] [--held-out 100]

Splits the 2,026 conversations of `chatterbot-corpus==1.3.3` (a PyPI package) into held-out and
training rows (seeded; no held-out question is asked by any training row), fine-tunes the default model with `llamaherd train sft`, and reports on the
held-out conversations the validation loss before and after, and one behaviour the tuning changes:
the corpus answers in a sentence or two, so the length of the model's greedy answers to the
held-out questions, next to the reference answers' length. Writes bench/results/demo_sft.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def answers(model: str, questions: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of `model` to each question, in its chat format, through the engine."""
    import llamaherd
    from llamaherd.chat import build_prompt

    llm = llamaherd.load(model, dtype="float32")  # the base and the tuned model alike
    prompts = [build_prompt(llm.chat_format, [{"role": "user", "content": q}]) for q in questions]
    done = llm.generate(prompts, max_new_tokens=max_tokens, temperature=0.0)
    return [c.text.strip() for c in done]


def words(texts: list[str]) -> float:
    return statistics.mean(len(t.split()) for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from llamaherd import datasets

    work = RESULTS / "demo-sft"
    work.mkdir(parents=True, exist_ok=True)
    rows = datasets.rows("chatterbot-english")
    # the corpus repeats some conversations (and questions): the held-out questions are ones
    # that no training row asks
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        by_question.setdefault(row["messages"][0]["content"].strip().lower(), []).append(row)
    questions = sorted(by_question)
    random.Random(a.seed).shuffle(questions)
    held = [by_question[q][0] for q in questions[:a.held_out]]
    train = [row for q in questions[a.held_out:] for row in by_question[q]]
    datasets.write_jsonl(train, work / "train.jsonl")
    datasets.write_jsonl(held, work / "held-out.jsonl")
    out = work / ("tuned-lora" if a.lora else "tuned")
    cmd = [sys.executable, "-m", "llamaherd.cli", "train", "sft", "--data",
           str(work / "train.jsonl"), "--val-data", str(work / "held-out.jsonl"), "--out",
           str(out), "--epochs", str(a.epochs), "--seed", str(a.seed), "--eval-every", "50"]
    if a.lora:
        cmd.append("--lora")
    subprocess.run(cmd, check=True)
    summary = json.loads((out / "summary.json").read_text())

    questions = [r["messages"][0]["content"] for r in held]
    references = [r["messages"][1]["content"] for r in held]
    before = answers("smollm2-135m-instruct", questions, a.max_tokens)
    after = answers(str(out), questions, a.max_tokens)
    report = {
        "train_rows": len(train), "held_out_rows": len(held), "lora": a.lora,
        "epochs": a.epochs, "steps": summary["steps"],
        "eval_loss_before": summary["eval_loss_before"],
        "eval_loss_after": summary["eval_loss_after"],
        "tokens_per_s": summary["tokens_per_s"],
        "answer_words": {"reference": words(references), "before": words(before),
                         "after": words(after)},
        "examples": [{"question": q, "reference": r, "before": b, "after": f}
                     for q, r, b, f in list(zip(questions, references, before, after))[:5]],
    }
    (RESULTS / "demo_sft.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    for ex in report["examples"]:
        print(f"\nQ: {ex['question']}\n  reference: {ex['reference']}\n  before: "
              f"{ex['before'][:200]}\n  after:  {ex['after'][:200]}")


if __name__ == "__main__":
    main()
