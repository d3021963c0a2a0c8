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


def sft(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Supervised fine-tuning (llamaherd.train.sft); settings are TrainConfig fields, or pass a
    TrainConfig. Returns the output directory."""
    from llamaherd.train.recipes.sft import sft as run

    return run(config if config is not None else TrainConfig.make(**settings))


def reward(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Train a reward model on preference pairs (llamaherd.train.reward); as sft."""
    from llamaherd.train.recipes.reward import reward as run

    return run(config if config is not None else TrainConfig.make(**settings))


def dpo(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Direct preference optimization on preference pairs (llamaherd.train.dpo); as sft."""
    from llamaherd.train.recipes.dpo import dpo as run

    return run(config if config is not None else TrainConfig.make(**settings))


def distill(config: TrainConfig | None = None, **settings: Any) -> Path:
    """Distill a teacher's top-k logits into the model, optionally pruned first
    (llamaherd.train.distill); as sft."""
    from llamaherd.train.recipes.distill import distill as run

    return run(config if config is not None else TrainConfig.make(**settings))


__all__ = ["TrainConfig", "distill", "dpo", "reward", "sft"]
