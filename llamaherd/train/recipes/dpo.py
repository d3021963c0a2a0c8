"""The DPO recipe (Llama 3's): preference pairs in, a model that prefers the chosen answers out.

    llamaherd train dpo --data pairs.jsonl --out tuned [--beta 0.1] [--nll 0.2] [--lora]

Loss per pair: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))) plus
`nll` times the chosen answer's mean NLL per token. The log-probabilities leave out formatting
tokens (the end-of-turn and end-of-text tokens; headers are never trained tokens). The
reference is the starting model: its log-probabilities are computed once, before the first
update, in the precision training runs in (with LoRA this is the base model, the adapters
starting at zero), so no second model is kept in memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from llamaherd.chat import ChatFormat
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataStats
from llamaherd.train.losses import dpo_loss, sequence_log_probs
from llamaherd.train.losses.dpo import SequenceLogProbs
from llamaherd.train.packing import pack
from llamaherd.train.preference import Pair, load_pairs, sides
from llamaherd.train.recipes.common import Recipe, run_recipe
from llamaherd.train.trainer import Objective, Trainer


def formatting_ids(fmt: ChatFormat, tokenizer: Tokenizer) -> frozenset[int]:
    """The tokens left out of DPO's log-probabilities: end-of-turn and end-of-text."""
    ids = set(fmt.stop_ids)
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return frozenset(ids)


@dataclass
class DPOObjective:
    max_len: int
    formatting: frozenset[int]
    beta: float = 0.1
    nll: float = 0.2

    def log_probs(self, model: nn.Module, pairs: Sequence[Pair]) -> SequenceLogProbs:
        return sequence_log_probs(model, pack(sides(pairs), self.max_len), 2 * len(pairs),
                                  self.formatting)

    def terms(self, model: nn.Module, pairs: Sequence[Pair]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair DPO loss, per-pair chosen mean NLL, per-pair implicit reward margin)."""
        if any(p.reference is None for p in pairs):
            raise RuntimeError("DPO pairs need their reference log-probabilities first")
        lp = self.log_probs(model, pairs)
        ref = torch.tensor([p.reference for p in pairs], dtype=torch.float32)  # (P, 2)
        chosen, rejected = lp.scored[0::2], lp.scored[1::2]
        losses = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
        nll = -lp.trained[0::2] / lp.count[0::2].clamp(min=1)
        margin = self.beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))
        return losses, nll, margin

    def loss(self, model: nn.Module, pairs: Sequence[Pair]) -> torch.Tensor:
        losses, nll, _ = self.terms(model, pairs)
        return (losses + self.nll * nll).sum()

    def measure(self, model: nn.Module, pairs: Sequence[Pair]) -> dict[str, float]:
        losses, nll, margin = self.terms(model, pairs)
        return {"loss": float((losses + self.nll * nll).sum()), "dpo": float(losses.sum()),
                "nll": float(nll.sum()), "accuracy": float((margin > 0).sum()),
                "margin": float(margin.sum())}

    def count(self, pairs: Sequence[Pair]) -> int:
        return len(pairs)

    def tokens(self, pairs: Sequence[Pair]) -> int:
        return sum(len(p) for p in pairs)

    @torch.no_grad()
    def set_reference(self, trainer: Trainer, pairs: Sequence[Pair]) -> None:
        """Each pair's reference log-probabilities (chosen, rejected) from the model as it is
        now, in micro-batches of the trainer's size. Every process computes them for every pair,
        so that the sharded forwards match across processes."""
        trainer.model.eval()
        todo = [p for p in pairs if p.reference is None]
        for group in trainer.by_tokens(todo):
            with trainer.autocast():
                lp = self.log_probs(trainer.model, group)
            for i, p in enumerate(group):
                p.reference = (float(lp.scored[2 * i]), float(lp.scored[2 * i + 1]))


class DPO(Recipe):
    name = "dpo"

    def __init__(self) -> None:
        self.formatting: frozenset[int] = frozenset()
        self.reference_s = 0.0

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        self.formatting = formatting_ids(fmt, tokenizer)
        return load_pairs(path, fmt, tokenizer, config.max_len, config.overlong)

    def objective(self, config: TrainConfig) -> Objective:
        return DPOObjective(config.max_len, self.formatting, config.beta, config.nll)

    def start(self, trainer: Trainer, train: Sequence[Any], validation: Sequence[Any]) -> None:
        if trainer.world.main:
            tqdm.write(f"reference log-probabilities of {len(train) + len(validation)} pairs")
        started = time.perf_counter()
        trainer.objective.set_reference(trainer, [*train, *validation])  # type: ignore[attr-defined]
        self.reference_s = time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        return {"reference_s": self.reference_s}


def dpo(config: TrainConfig) -> Path:
    """Run DPO as `config` says; returns the output directory."""
    return run_recipe(DPO(), config)
