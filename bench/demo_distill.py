"""Distillation demonstration: Llama 3.2's small-model recipe (prune, then distill from the
larger model's logits) on SmolLM2-135M-Instruct and the Python documentation's sources.

    .venv/bin/python bench/demo_distill.py [--train-rows 300] [--held-out 40] [--steps 150]

Rows of the `python-docs` dataset (Debian's python3.11-doc) are split, seeded and by source
file (no held-out file is trained on), into training and held-out rows. Four models' held-out
perplexity, all measured by the same function in float32:
1. the teacher: the default model, 30 layers;
2. the student before any training: the model pruned to half its layers (the first, the last
   and the rest evenly spaced; llamaherd.train.prune);
3. the student distilled: `llamaherd.train.distill` with prune_keep, the loss kd_ratio times the
   KL to the teacher's top-k plus (1 - kd_ratio) times the next-token NLL;
4. the student trained plainly: the same distill recipe with kd_ratio=0, so the same pruning,
   data, batches, seed, learning rate and steps, and the loss is the next-token NLL alone
   (kd_ratio=0 makes the KL term's weight and its gradient exactly zero; the KL is still
   measured and logged). Its teacher cache is copied from run 3, so the teacher is not run
   again.
Prints a table and writes bench/results/demo_distill.json. The defaults (one epoch over 300
rows: 150 steps of 2 rows of at most 256 tokens, about 75,000 tokens a run) are sized for about
a quarter of an hour on two otherwise idle CPU cores, at the ~150-250 tokens/s of training there.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m-instruct"


def split_by_source(rows: list[dict], held_out: int, train_rows: int, seed: int
                    ) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the source files shuffled with `seed`; one random row of each of the
    first `held_out` files is held out, and `train_rows` rows are drawn from the other files."""
    rng = random.Random(seed)
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    sources = sorted(by_source)
    rng.shuffle(sources)
    held = [rng.choice(by_source[s]) for s in sources[:held_out]]
    rest = [row for s in sources[held_out:] for row in by_source[s]]
    return rng.sample(rest, min(train_rows, len(rest))), held


def held_out_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """Each held-out row tokenized as training reads a text row: BOS (where the model uses one),
    the text, EOS."""
    return [tokenizer.encode_prompt(row["text"]) + [tokenizer.eos_id] for row in rows]


def perplexity(model, rows: list[list[int]], window: int) -> float:
    """Token-level perplexity over the rows: exp of the mean NLL of every token after each row's
    first, the model in float32; a row longer than `window` is scored in windows advancing by
    half of it (llamaherd.eval.perplexity.token_nlls), so each token keeps at least window / 2
    tokens of context."""
    from llamaherd.eval.perplexity import token_nlls

    model = model.float().eval()
    nlls = [token_nlls(lambda ids: model(torch.tensor([ids]))[0], ids, window=window,
                       stride=window // 2) for ids in rows]
    return math.exp(torch.cat(nlls).mean().item())


def trained_perplexity(out: Path, rows: list[list[int]], window: int) -> float:
    from llamaherd.api import open_checkpoint

    ckpt, _ = open_checkpoint(out, dtype="float32")
    return perplexity(ckpt.model, rows, window)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-rows", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=40, help="held-out rows (one a file)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=2, help="rows an optimizer step")
    ap.add_argument("--max-len", type=int, default=256,
                    help="training rows are cut to this; held-out windows are this long")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prune-keep", type=int, default=None,
                    help="layers the student keeps (default: half of the model's)")
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--kd-top-k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import llamaherd.train
    from llamaherd import datasets
    from llamaherd.api import open_checkpoint
    from llamaherd.train.prune import layers_to_keep, prune_layers
    from llamaherd.train.teacher import CACHE, CACHE_INFO

    work = RESULTS / "demo-distill"
    work.mkdir(parents=True, exist_ok=True)
    train, held = split_by_source(datasets.rows("python-docs"), a.held_out, a.train_rows, a.seed)
    datasets.write_jsonl(train, work / "train.jsonl")
    datasets.write_jsonl(held, work / "held-out.jsonl")

    teacher, tokenizer = open_checkpoint(MODEL, dtype="float32")
    n_layers = teacher.args.n_layers
    keep = a.prune_keep or n_layers // 2
    ids = held_out_ids(tokenizer, held)
    ppl: dict[str, float] = {}
    ppl["teacher"] = perplexity(teacher.model, ids, a.max_len)
    student = prune_layers(teacher.model, n_keep=keep)  # the blocks distill's prune_keep keeps
    ppl["pruned"] = perplexity(student, ids, a.max_len)
    del teacher, student

    # both runs: the held-out rows are measured here, so the recipe holds none out of the data
    common = {"model": MODEL, "teacher": MODEL, "prune_keep": keep,
              "data": str(work / "train.jsonl"), "val_fraction": 0.0, "steps": a.steps,
              "batch_size": a.batch_size, "max_len": a.max_len, "lr": a.lr,
              "kd_temperature": a.kd_temperature, "kd_top_k": a.kd_top_k, "seed": a.seed}
    runs: dict[str, dict] = {}
    for name, ratio in (("distilled", a.kd_ratio), ("plain", 0.0)):
        out = work / name
        if name == "plain":  # the same teacher on the same data: reuse run 3's top-k
            out.mkdir(parents=True, exist_ok=True)
            for file in (CACHE, CACHE_INFO):
                shutil.copy(work / "distilled" / file, out / file)
        started = time.perf_counter()
        llamaherd.train.distill(out=str(out), kd_ratio=ratio, **common)
        summary = json.loads((out / "summary.json").read_text())
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # optimizer state: ~1.3 GB a run
        runs[name] = {"kd_ratio": ratio, "steps": summary["steps"],
                      "seconds": time.perf_counter() - started,
                      "teacher_cache": summary.get("teacher_cache"),
                      "tokens_per_s": summary.get("tokens_per_s")}
        ppl[name] = trained_perplexity(out, ids, a.max_len)

    report = {
        "model": MODEL, "n_layers": n_layers, "student_layers": keep,
        "kept_layers": layers_to_keep(n_layers, n_keep=keep),
        "train_rows": len(train), "held_out_rows": len(held),
        "held_out_tokens": sum(len(r) - 1 for r in ids),
        "settings": vars(a), "runs": runs, "held_out_perplexity": ppl,
    }
    (RESULTS / "demo_distill.json").write_text(json.dumps(report, indent=2) + "\n")
    labels = {"teacher": f"teacher ({n_layers} layers)",
              "pruned": f"student ({keep} layers), before training",
              "distilled": f"student distilled (kd_ratio {a.kd_ratio})",
              "plain": "student, NLL only (kd_ratio 0)"}
    print(f"\nheld-out perplexity: {len(held)} rows, {report['held_out_tokens']} tokens; "
          f"{len(train)} training rows, {a.steps} steps of {a.batch_size}")
    for key, label in labels.items():
        print(f"  {label:42s} {ppl[key]:10.2f}")
    print(f"wrote {RESULTS / 'demo_distill.json'}")


if __name__ == "__main__":
    main()
