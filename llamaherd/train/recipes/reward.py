"""The reward-model recipe: preference pairs in, a model that scores conversations out.

    llamaherd train reward --data pairs.jsonl --out rm [--margin-scale large|small|none]

The backbone (full or LoRA) and a new scalar head learn the ranking loss
-log sigmoid(r_chosen - r_rejected - margin); validation reports the loss and the pairwise
accuracy (the share of held-out pairs whose chosen answer scores higher). The output directory is
a LlamaForSequenceClassification that `RewardModel.load` and `llamaherd score` read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaherd.chat import ChatFormat
from llamaherd.checkpoint import Checkpoint
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataStats
from llamaherd.train.losses import last_token_scores, ranking_loss
from llamaherd.train.packing import pack
from llamaherd.train.preference import Pair, load_pairs, sides
from llamaherd.train.recipes.common import Recipe, run_recipe
from llamaherd.train.reward_model import SCORE, add_score_head
from llamaherd.train.trainer import Objective


@dataclass
class RewardObjective:
    """The ranking loss summed over pairs (averaged over pairs by the trainer)."""

    max_len: int
    use_margin: bool = True

    def rewards(self, model: nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
        scores = last_token_scores(model, getattr(model, SCORE), pack(sides(pairs), self.max_len),
                                   2 * len(pairs))
        return scores[0::2], scores[1::2]

    def loss(self, model: nn.Module, pairs: Sequence[Pair]) -> torch.Tensor:
        chosen, rejected = self.rewards(model, pairs)
        margin = torch.tensor([p.margin for p in pairs]) if self.use_margin else 0.0
        return ranking_loss(chosen, rejected, margin).sum()

    def measure(self, model: nn.Module, pairs: Sequence[Pair]) -> dict[str, float]:
        chosen, rejected = self.rewards(model, pairs)
        margin = torch.tensor([p.margin for p in pairs]) if self.use_margin else 0.0
        return {"loss": float(ranking_loss(chosen, rejected, margin).sum()),
                "accuracy": float((chosen > rejected).sum()),
                "margin": float((chosen - rejected).sum())}

    def count(self, pairs: Sequence[Pair]) -> int:
        return len(pairs)

    def tokens(self, pairs: Sequence[Pair]) -> int:
        return sum(len(p) for p in pairs)


class Reward(Recipe):
    name = "reward"

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        scale = config.margin_scale if config.margin_scale != "none" else "large"
        return load_pairs(path, fmt, tokenizer, config.max_len, config.overlong, scale)

    def objective(self, config: TrainConfig) -> Objective:
        return RewardObjective(config.max_len, use_margin=config.margin_scale != "none")

    def extend(self, model: nn.Module, ckpt: Checkpoint, config: TrainConfig) -> None:
        weight = ckpt.heads.get(f"{SCORE}.weight")  # continue a reward model, or start one
        add_score_head(model, weight, seed=config.seed)

    def unfreeze(self, model: nn.Module) -> None:
        getattr(model, SCORE).weight.requires_grad_(True)


def reward(config: TrainConfig) -> Path:
    """Train a reward model as `config` says; returns the output directory."""
    return run_recipe(Reward(), config)
