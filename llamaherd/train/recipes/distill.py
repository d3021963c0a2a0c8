"""The distillation recipe (Llama 3.2 1B and 3B's): a student, optionally a pruned copy of the
model, learns a teacher's distribution over the next token along with the data's own tokens.

    llamaherd train distill --model smollm2-135m-instruct --data chats.jsonl --out student \
        [--teacher bigger-model] [--prune-keep 15] [--kd-ratio 0.5] [--kd-temperature 1.0]

Data as for SFT (messages, prompt/completion or text rows); the loss covers the same tokens:
kd_ratio times T^2 KL(teacher top-k || student) at temperature T plus (1 - kd_ratio) times the
NLL of the true tokens (llamaherd.train.losses.distill). The teacher (default: the model itself,
the usual choice after pruning) runs once, before training, and its top-k logits are cached in
the output directory (llamaherd.train.teacher), so a second run on the same data reuses them.
With prune_keep the student keeps that many of the model's blocks (the first, the last, the
rest evenly spaced; llamaherd.train.prune) and the exported model has that many layers.
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
from llamaherd.checkpoint import Checkpoint
from llamaherd.tokenizer import Tokenizer
from llamaherd.train import distributed
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataStats, load_examples
from llamaherd.train.losses.distill import DistillTerms, distill_loss
from llamaherd.train.packing import pack
from llamaherd.train.prune import keep_layers, layers_to_keep
from llamaherd.train.recipes.common import Recipe, run_recipe
from llamaherd.train.teacher import (
    CACHE,
    TaughtExample,
    attach_top_k,
    cache_teacher,
    top_k_of_batch,
)
from llamaherd.train.trainer import Objective, Trainer


@dataclass
class DistillObjective:
    """Distillation from the examples' cached teacher top-k, mixed with the next-token NLL,
    over the trained tokens of examples packed into rows of max_len."""

    max_len: int
    ratio: float = 0.5
    temperature: float = 1.0

    def terms(self, model: nn.Module, examples: Sequence[TaughtExample]) -> DistillTerms:
        batch = pack(examples, self.max_len)
        ids, logits = top_k_of_batch(examples, batch)
        return distill_loss(model, batch, ids, logits,  # type: ignore[arg-type]
                            self.ratio, self.temperature)

    def loss(self, model: nn.Module, examples: Sequence[TaughtExample]) -> torch.Tensor:
        return self.terms(model, examples).loss

    def measure(self, model: nn.Module, examples: Sequence[TaughtExample]) -> dict[str, float]:
        t = self.terms(model, examples)
        return {"loss": float(t.loss), "kd": float(t.kd), "nll": float(t.nll)}

    def count(self, examples: Sequence[TaughtExample]) -> int:
        return sum(e.trained for e in examples)

    def tokens(self, examples: Sequence[TaughtExample]) -> int:
        return sum(len(e) for e in examples)


class Distill(Recipe):
    name = "distill"

    def __init__(self) -> None:
        self.vocab_size: int | None = None
        self.kept: list[int] | None = None  # the blocks the student kept, when pruned
        self.n_layers = 0  # the model's blocks before pruning
        self.teacher_s = 0.0
        self.teacher_cache = ""  # "computed" or "reused"

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        examples, stats = load_examples(path, fmt, tokenizer, config.max_len, config.overlong)
        return [TaughtExample(e.tokens, e.labels, e.where) for e in examples], stats

    def objective(self, config: TrainConfig) -> Objective:
        return DistillObjective(config.max_len, config.kd_ratio, config.kd_temperature)

    def extend(self, model: nn.Module, ckpt: Checkpoint, config: TrainConfig) -> None:
        """Prune the student to `prune_keep` blocks; the checkpoint takes the new args, so that
        the export writes the pruned config."""
        self.vocab_size, self.n_layers = ckpt.args.vocab_size, ckpt.args.n_layers
        if config.prune_keep is None or config.prune_keep == ckpt.args.n_layers:
            return
        self.kept = layers_to_keep(ckpt.args.n_layers, n_keep=config.prune_keep)
        ckpt.args = keep_layers(model, self.kept)  # type: ignore[arg-type]

    def start(self, trainer: Trainer, train: Sequence[Any], validation: Sequence[Any]) -> None:
        config, world = trainer.config, trainer.world
        teacher = config.teacher or config.model
        examples = [*train, *validation]
        started = time.perf_counter()
        if world.main and self.kept is not None:
            tqdm.write(f"distill: the student keeps blocks {self.kept} of {self.n_layers}")
        if world.main:  # one process runs the teacher; every process reads the cache
            computed = cache_teacher(teacher, examples, trainer.out, config.kd_top_k,
                                     config.max_len, config.micro_tokens, world.device,
                                     self.vocab_size)
            self.teacher_cache = "computed" if computed else "reused"
            tqdm.write(f"teacher top-{config.kd_top_k} of {len(examples)} examples: "
                       f"{self.teacher_cache} {trainer.out / CACHE} ({teacher})")
        distributed.barrier(world)
        attach_top_k(examples, trainer.out)
        self.teacher_s = time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"teacher_s": self.teacher_s, "teacher_cache": self.teacher_cache}
        if self.kept is not None:
            out["kept_layers"] = self.kept
        return out


def distill(config: TrainConfig) -> Path:
    """Run distillation as `config` says; returns the output directory."""
    return run_recipe(Distill(), config)
