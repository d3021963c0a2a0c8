"""The supervised fine-tuning recipe: a chat JSONL in, a model directory that loads, runs and
serves out.

    llamaherd train sft --model smollm2-135m-instruct --data chats.jsonl --out tuned [--lora]
    torchrun --nproc_per_node 2 -m llamaherd.cli train sft ...     (the same run on 2 processes)

The output directory holds the model in Hugging Face form (config.json, model.safetensors, the
tokenizer files and chat template; LoRA adapters merged, and also kept in adapter.safetensors),
`metrics.jsonl`, `loss.png`, `summary.json`, `train_config.json` and `checkpoints/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaherd.chat import ChatFormat
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataStats, Example, load_examples
from llamaherd.train.losses import sft_loss
from llamaherd.train.packing import pack
from llamaherd.train.recipes.common import Recipe, run_recipe
from llamaherd.train.trainer import Objective


@dataclass
class SFTObjective:
    """Next-token NLL over the trained tokens of examples packed into rows of max_len (their
    common untrained prefix once a row with share_prefix)."""

    max_len: int
    share_prefix: bool = False

    def loss(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        return sft_loss(model, pack(examples, self.max_len, self.share_prefix))

    def count(self, examples: Sequence[Example]) -> int:
        return sum(e.trained for e in examples)

    def tokens(self, examples: Sequence[Example]) -> int:
        return sum(len(e) for e in examples)


class SFT(Recipe):
    name = "sft"

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        return load_examples(path, fmt, tokenizer, config.max_len, config.overlong)

    def objective(self, config: TrainConfig) -> Objective:
        return SFTObjective(config.max_len, config.share_prefix)


def sft(config: TrainConfig) -> Path:
    """Run supervised fine-tuning as `config` says; returns the output directory."""
    return run_recipe(SFT(), config)
