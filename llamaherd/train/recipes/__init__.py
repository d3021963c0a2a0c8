"""Training recipes, by name: each a function from a TrainConfig to the output directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llamaherd.train.config import TrainConfig
from llamaherd.train.recipes.classify import classify
from llamaherd.train.recipes.distill import distill
from llamaherd.train.recipes.dpo import dpo
from llamaherd.train.recipes.online import grpo, ppo
from llamaherd.train.recipes.reward import reward
from llamaherd.train.recipes.sft import sft

RECIPES: dict[str, Callable[[TrainConfig], Path]] = {"sft": sft, "reward": reward, "dpo": dpo,
                                                 "distill": distill, "grpo": grpo, "ppo": ppo,
                                                 "classify": classify}
