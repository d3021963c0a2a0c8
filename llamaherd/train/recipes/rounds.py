"""Rounds of post-training as Llama 3 ran them: rejection sampling, SFT on the kept answers, DPO
on pairs from the same samples, the round's model drawing the next round's samples.

    llamaherd train rounds --model M --data prompts.jsonl --out runs --verifier math --rounds 2

Each round r writes `out/round-r/`: samples.jsonl (the best answer of each prompt, with every
sample and its reward), sft.jsonl (the kept answers: those at the round's best reward when a
verifier judges, else every prompt's best), pairs.jsonl (best against worst, where they differ),
sft/ and dpo/ (model directories). `out/rounds.json` lists each round's sampled and kept mean
rewards, counts and, with held-out prompts, the greedy mean reward of the round's model.
Samples are drawn through the engine on the model's weights packed as Q8_0.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

import llamaherd
from llamaherd.datasets import write_jsonl
from llamaherd.train.config import TrainConfig
from llamaherd.train.rejection import (
    greedy_reward,
    make_judge,
    read_prompt_rows,
    report_dict,
    sample_best,
)


def run_rounds(config: TrainConfig, rounds: int = 2, k: int = 8,
               sft_settings: dict[str, Any] | None = None,
               dpo_settings: dict[str, Any] | None = None) -> Path:
    """`rounds` rounds from config.model on the prompts of config.data (see the module
    docstring); config's other fields (lr, batch_size, lora, ...) set both trainings, and
    sft_settings / dpo_settings override them for one. Returns config.out."""
    from llamaherd.train.recipes.dpo import dpo
    from llamaherd.train.recipes.sft import sft

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = make_judge(config.verifier, config.reward_model)
    prompts = read_prompt_rows(config.data)
    held = read_prompt_rows(config.val_data) if config.val_data else []
    model = config.model
    report: list[dict[str, Any]] = []
    if held:
        report.append({"round": 0, "model": model,
                       "held_out_reward": greedy_reward(llamaherd.load(model, quant="q8_0"), held,
                                                        judge, config.max_new_tokens)})
    for r in range(1, rounds + 1):
        folder = out / f"round-{r}"
        folder.mkdir(exist_ok=True)
        llm = llamaherd.load(model, quant="q8_0")
        kept, stats = sample_best(llm, prompts, judge, k=k, out=folder / "samples.jsonl",
                                  pairs_out=folder / "pairs.jsonl", temperature=config.temperature,
                                  max_new_tokens=config.max_new_tokens,
                                  seed=config.seed + 1000 * r, keep_all=True)
        del llm
        best = max(item["reward"] for item in kept)
        if config.verifier and best <= 0:
            raise ValueError(f"round {r}: no sampled answer earned a reward above 0; nothing "
                             "to train on (more samples, -k, or easier prompts)")
        chosen = [item for item in kept if item["reward"] == best] if config.verifier else kept
        write_jsonl(({"messages": item["messages"]} for item in chosen), folder / "sft.jsonl")
        n_pairs = stats.pairs
        tqdm.write(f"round {r}: sampled mean reward {stats.mean_reward:.3f}, kept "
                   f"{len(chosen)} answers, {n_pairs} pairs")
        common = {"val_data": None, "val_fraction": 0.0, "resume": False}
        sft_config = replace(config, model=model, data=str(folder / "sft.jsonl"),
                             out=str(folder / "sft"), **common, **(sft_settings or {}))
        model = str(sft(sft_config))
        if n_pairs:
            dpo_config = replace(config, model=model, data=str(folder / "pairs.jsonl"),
                                 out=str(folder / "dpo"), **common, **(dpo_settings or {}))
            model = str(dpo(dpo_config))
        row: dict[str, Any] = {"round": r, "model": model, "sampling": report_dict(stats),
                               "kept": len(chosen), "pairs": n_pairs}
        if held:
            row["held_out_reward"] = greedy_reward(llamaherd.load(model, quant="q8_0"), held,
                                                   judge, config.max_new_tokens)
            tqdm.write(f"round {r}: held-out greedy reward {row['held_out_reward']:.3f}")
        report.append(row)
        (out / "rounds.json").write_text(json.dumps(report, indent=2) + "\n")
    return out
