"""llamaherd's own guards, built by its own post-training pipeline from the labelled data of
llamaherd.safety.data, and judged on the held-out split:

- `llamaherd-guard`: the default model fine-tuned (SFT, the whole model) to answer the Llama
  Guard 3 prompt (categories S1-S13, as the 1B guard) with `safe` or `unsafe\\nS..`; written as a
  Q8_0 GGUF for the engine's packed kernels;
- `llamaherd-prompt-guard`: the default model's first and last blocks and ten between them,
  with a three-way class head (benign, injection, jailbreak) trained on the Prompt Guard
  protocol (llamaherd train classify); a Hugging Face LlamaForSequenceClassification directory.

`llamaherd pull llamaherd-guard` runs build_guard into the cache when the guard is not there.
Each build writes `report.json` beside the model: the held-out figures (llamaherd.safety.metrics)
and how long each phase took.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llamaherd.hub import DEFAULT_MODEL
from llamaherd.safety import data
from llamaherd.safety.categories import LLAMA_GUARD_3_1B
from llamaherd.safety.llama_guard import LlamaGuard, render
from llamaherd.safety.metrics import binary, by_category
from llamaherd.safety.prompt_guard import PromptGuard

GUARD_FILE = "llamaherd-guard.Q8_0.gguf"
PROMPT_GUARD_DIR = "model"

# One epoch over ~2,100 examples; the ~230-token instructions every example starts with are
# computed once a packed row (share_prefix), which makes an epoch about three times cheaper.
GUARD_TRAINING: dict[str, Any] = {
    "epochs": 1, "batch_size": 16, "lr": 5e-5, "max_len": 2048, "micro_tokens": 8192,
    "share_prefix": True, "eval_every": 0,
}
PROMPT_GUARD_TRAINING: dict[str, Any] = {
    "epochs": 3, "batch_size": 16, "lr": 1e-4, "max_len": 512, "micro_tokens": 4096,
    "prune_keep": 12, "eval_every": 0,
}


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def guard_row(item: data.GuardItem) -> dict[str, Any]:
    """An SFT row: the classification request as the user turn, the verdict as the answer."""
    return {"messages": [{"role": "user", "content": render(item.messages, LLAMA_GUARD_3_1B)},
                         {"role": "assistant", "content": item.answer}]}


def log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def evaluate_guard(guard: LlamaGuard, items: Sequence[data.GuardItem]) -> dict[str, Any]:
    """The guard's verdicts on held-out items: prompts (`User`) and answers (`Agent`) apart,
    each overall and per category, and the accuracy per source."""
    verdicts = guard.check_many([i.messages for i in items], on_error="flag")
    report: dict[str, Any] = {}
    for role, last in (("prompts", "user"), ("responses", "assistant")):
        pairs = [(i, v) for i, v in zip(items, verdicts) if i.messages[-1]["role"] == last]
        if not pairs:
            continue
        report[role] = {
            "overall": binary([not i.safe for i, _ in pairs],
                              [not v.safe for _, v in pairs]).to_dict(),
            "by_category": by_category([i.categories for i, _ in pairs],
                                       [v.categories for _, v in pairs], guard.categories),
        }
    sources: dict[str, list[bool]] = {}
    for i, v in zip(items, verdicts):
        sources.setdefault(i.source, []).append(i.safe == v.safe)
    report["by_source"] = {s: {"n": len(ok), "accuracy": sum(ok) / len(ok)}
                           for s, ok in sorted(sources.items())}
    report["answer_errors"] = sum(v.error is not None for v in verdicts)
    return report


def evaluate_prompt_guard(guard: PromptGuard, items: Sequence[data.PromptItem]
                          ) -> dict[str, Any]:
    """The classifier's verdicts on held-out texts: malicious (injection or jailbreak) against
    benign by the injection score, jailbreak against the rest by the jailbreak score, per class
    and per source."""
    verdicts = guard.check_many([i.text for i in items])
    thresholds = (guard.injection_threshold or 1.0, guard.jailbreak_threshold or 1.0)
    report: dict[str, Any] = {
        "malicious": binary([i.label > 0 for i in items],
                            [v.injection_score >= thresholds[0] for v in verdicts]).to_dict(),
        "jailbreak": binary([i.label == 2 for i in items],
                            [v.jailbreak_score >= thresholds[1] for v in verdicts]).to_dict(),
        "injection_only": binary([i.label == 1 for i in items if i.label != 2],
                                 [v.injection_score >= thresholds[0]
                                  for i, v in zip(items, verdicts) if i.label != 2]).to_dict(),
    }
    names = data.PROMPT_GUARD_LABELS
    report["confusion"] = {names[t]: dict(Counter(v.label for i, v in zip(items, verdicts)
                                                  if i.label == t)) for t in range(3)}
    sources: dict[str, list[bool]] = {}
    for i, v in zip(items, verdicts):
        sources.setdefault(i.source, []).append((i.label > 0) == (v.injection_score
                                                                  >= thresholds[0]))
    report["by_source"] = {s: {"n": len(ok), "accuracy": sum(ok) / len(ok)}
                           for s, ok in sorted(sources.items())}
    return report


def judge_held_out(name: str, out: Path, evaluate: Callable[[list[Any]], dict[str, Any]],
                   items: list[Any], started: float, quiet: bool, **record: Any) -> None:
    """Write a build's report.json: `evaluate` on the held-out items, with `record` and the
    timings; log its headline."""
    log(quiet, f"{name}: trained in {record.get('train_s', 0):.0f} s; judging "
               f"{len(items)} held-out items")
    evaluated = time.perf_counter()
    report = evaluate(items)
    report.update(record, test_examples=len(items),
                  evaluate_s=time.perf_counter() - evaluated,
                  build_s=time.perf_counter() - started)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(quiet, summary_line(name, report))


def judged_items(items: list[Any], judge: int | None, seed: int) -> list[Any]:
    """The held-out items to judge: all, or `judge` of them drawn at random."""
    return items if judge is None else random.Random(seed).sample(items, min(judge, len(items)))


def _train(recipe: str, rows: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]],
           work: Path, base: str, settings: dict[str, Any]) -> Path:
    from llamaherd.train import TrainConfig
    from llamaherd.train.recipes import RECIPES

    if "steps" in settings and "epochs" in settings:  # a step count given overrides epochs
        settings = {k: v for k, v in settings.items() if k != "epochs"}
    config = TrainConfig.make(model=base, data=str(write_jsonl(rows, work / "train.jsonl")),
                              val_data=str(write_jsonl(val, work / "val.jsonl")),
                              out=str(work / "trained"), **settings)
    out = RECIPES[recipe](config)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resumable state, not the model
    return out


def build_guard(out: str | Path, *, base: str = DEFAULT_MODEL, quiet: bool = False,
                seed: int = 0, judge: int | None = None, **training: Any) -> Path:
    """Train llamaherd-guard into `out` (its GGUF, the training record, report.json); returns
    the GGUF's path. `training` overrides GUARD_TRAINING; `judge` limits the held-out items
    judged (a quick build), all by default."""
    from llamaherd.api import load
    from llamaherd.convert import convert

    out = Path(out)
    started = time.perf_counter()
    parts = data.split(data.guard_items(seed=seed), seed=seed)
    train = [guard_row(i) for i in parts.train]
    random.Random(seed).shuffle(train)
    val = [guard_row(i) for i in random.Random(seed).sample(parts.test, min(64, len(parts.test)))]
    log(quiet, f"llamaherd-guard: {len(train)} training examples, {len(parts.test)} held out")
    trained = _train("sft", train, val, out / "training", base,
                     {**GUARD_TRAINING, **training})
    trained_s = time.perf_counter() - started
    gguf = convert(trained, out / GUARD_FILE, "gguf", gguf_type="Q8_0")
    (trained / "model.safetensors").unlink()  # the GGUF is the model; the record stays
    guard = LlamaGuard(load(gguf), categories=LLAMA_GUARD_3_1B)
    judge_held_out("llamaherd-guard", out, lambda items: evaluate_guard(guard, items),
                   judged_items(parts.test, judge, seed), started, quiet,
                   train_examples=len(train), base=base, train_s=trained_s)
    return gguf


def build_prompt_guard(out: str | Path, *, base: str = DEFAULT_MODEL, quiet: bool = False,
                       seed: int = 0, judge: int | None = None, **training: Any) -> Path:
    """Train llamaherd-prompt-guard into `out` (the model directory, report.json); returns the
    model directory. `training` overrides PROMPT_GUARD_TRAINING; `judge` limits the held-out
    texts judged."""
    from llamaherd.safety.prompt_guard import load_prompt_guard

    out = Path(out)
    started = time.perf_counter()
    parts = data.split(data.prompt_items(seed=seed), seed=seed)
    names = data.PROMPT_GUARD_LABELS
    train = [{"text": i.text, "label": names[i.label]} for i in parts.train]
    random.Random(seed).shuffle(train)
    val = [{"text": i.text, "label": names[i.label]}
           for i in random.Random(seed).sample(parts.test, min(64, len(parts.test)))]
    log(quiet, f"llamaherd-prompt-guard: {len(train)} training texts, {len(parts.test)} held out")
    trained = _train("classify", train, val, out / "training", base,
                     {**PROMPT_GUARD_TRAINING, **training})
    model = out / PROMPT_GUARD_DIR
    shutil.rmtree(model, ignore_errors=True)
    shutil.move(trained, model)
    trained_s = time.perf_counter() - started
    classifier = load_prompt_guard(model)
    judge_held_out("llamaherd-prompt-guard", out,
                   lambda items: evaluate_prompt_guard(classifier, items),
                   judged_items(parts.test, judge, seed), started, quiet,
                   train_examples=len(train), base=base, train_s=trained_s)
    return model


def summary_line(name: str, report: dict[str, Any]) -> str:
    """One line of a build report's headline figures."""
    parts = []
    for key in ("prompts", "responses", "malicious", "jailbreak"):
        if key in report:
            s = report[key].get("overall", report[key])
            parts.append(f"{key}: F1 {s['f1']:.3f}, FPR {s['fpr']:.3f}")
    return f"{name}: " + "; ".join(parts) + f" (built in {report['build_s']:.0f} s)"
