"""Post-training: data with loss masks, packing, losses, LoRA, the shared trainer (AdamW, mixed
precision, checkpoints and resume, FSDP2 across processes) and the recipes built on them.

    import llamaherd.train
    llamaherd.train.sft(model="smollm2-135m-instruct", data="chats.jsonl", out="tuned",
                        lora=True, steps=200)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaherd.train.config import TrainConfig


def _run(recipe: str, config: TrainConfig | None, settings: dict[str, Any]) -> Path:
    from llamaherd.train.recipes import RECIPES

    return RECIPES[recipe](config if config is not None else TrainConfig.make(**settings))


def sft(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Supervised fine-tuning; settings are TrainConfig fields, or pass a TrainConfig. Returns
    the output directory (as do all below)."""
    return _run("sft", config, settings)


def reward(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Train a reward model on preference pairs."""
    return _run("reward", config, settings)


def dpo(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Direct preference optimization on preference pairs."""
    return _run("dpo", config, settings)


def distill(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Distill a teacher's top-k logits into the model, optionally pruned first."""
    return _run("distill", config, settings)


def grpo(config: TrainConfig | None = None, **settings: Any) -> Path:
    """GRPO on prompts, rollouts through the engine, rewards from a verifier or reward model."""
    return _run("grpo", config, settings)


def ppo(config: TrainConfig | None = None, **settings: Any) -> Path:
    """PPO (Llama 2's recipe) on prompts, rollouts through the engine."""
    return _run("ppo", config, settings)


__all__ = ["TrainConfig", "distill", "dpo", "grpo", "ppo", "reward", "sft"]
