"""What every training recipe does around its objective: set up the processes and the output
directory, read the data through the model's chat format, build the model in training form, run
the Trainer, export a model directory that loads, runs and serves, and write a summary.

A recipe (SFT, reward model, DPO, distillation) supplies only what differs: how its data is read,
its Objective, what it adds to the model (a score head), and what it computes before training
(reference log-probabilities).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from llamaherd.api import open_checkpoint
from llamaherd.chat import ChatFormat, chat_format
from llamaherd.checkpoint import Checkpoint
from llamaherd.checkpoint.hf import save_hf
from llamaherd.convert import write_vocabulary
from llamaherd.tokenizer import Tokenizer
from llamaherd.train import distributed
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataStats, split
from llamaherd.train.distributed import World
from llamaherd.train.lora import apply_lora, merged_state_dict
from llamaherd.train.plot import plot_metrics
from llamaherd.train.trainer import METRICS, Objective, Trainer


class Recipe:
    """The parts of a training run that differ between methods (SFT's are the defaults)."""

    name = "sft"

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        """The examples of a JSONL file, and what reading them found."""
        raise NotImplementedError

    def objective(self, config: TrainConfig) -> Objective:
        raise NotImplementedError

    def extend(self, model: nn.Module, ckpt: Checkpoint, config: TrainConfig) -> None:
        """Add to the float model before adapters and sharding (e.g. a score head)."""

    def unfreeze(self, model: nn.Module) -> None:
        """Make trainable what LoRA froze but the recipe trains in full (a new head)."""

    def start(self, trainer: Trainer, train: Sequence[Any], validation: Sequence[Any]) -> None:
        """Compute what training needs from the starting model (e.g. reference log-probs)."""

    def exported(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained weights as the output directory should hold them (e.g. without a value
        head that only training needs)."""
        return state

    def fit(self, trainer: Trainer, train: Sequence[Any], validation: Sequence[Any]
            ) -> list[dict[str, Any]]:
        """Train (an online recipe draws its own examples); returns the logged metrics."""
        return trainer.fit(train, validation)

    def evaluate(self, trainer: Trainer, validation: Sequence[Any]) -> dict[str, float]:
        """The validation metrics of the model as it is now."""
        return trainer.evaluate(validation)

    def summary(self) -> dict[str, Any]:
        """What the recipe adds to summary.json (e.g. the time its start took)."""
        return {}


def prepare_model(ckpt: Checkpoint, config: TrainConfig, world: World, recipe: Recipe
                  ) -> nn.Module:
    """The float32 model in training form: extended by the recipe, adapters swapped in, blocks
    checkpointed, sharded."""
    model = ckpt.model.float().to(world.device)
    recipe.extend(model, ckpt, config)
    if config.lora:
        apply_lora(model, config.lora_config())
        recipe.unfreeze(model)
    if config.gradient_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    return distributed.shard(model.train(), world)


def export(model: nn.Module, ckpt: Checkpoint, tokenizer: Tokenizer, config: TrainConfig,
           out: Path, world: World, recipe: Recipe | None = None) -> None:
    """Write the trained model into `out` as a Hugging Face directory (every process takes part
    in gathering the weights; the first writes)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if recipe is not None:
        state = recipe.exported(state)
    if not world.main:
        return
    if config.lora:
        lora = config.lora_config()
        adapters = {k: v.contiguous() for k, v in state.items()
                    if ".lora_a." in k or ".lora_b." in k}
        save_file(adapters, out / "adapter.safetensors")
        (out / "adapter_config.json").write_text(json.dumps(
            {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
             "targets": list(lora.targets), "base_model": config.model}, indent=2) + "\n")
        state = merged_state_dict(state, lora.alpha / lora.rank)
    save_hf(state, ckpt.args, out)
    write_vocabulary(ckpt, out, tokenizer)


def run_recipe(recipe: Recipe, config: TrainConfig) -> Path:
    """Run `recipe` as `config` says, on this process and any others torchrun started; returns
    the output directory."""
    if not config.data or not config.out:
        raise ValueError(f"{recipe.name} needs data (a JSONL file) and out (a directory)")
    world = distributed.init()
    try:
        out = _run(recipe, config, world)
    except BaseException:
        distributed.close(world, failed=True)
        raise
    distributed.close(world)
    return out


def _threads(config: TrainConfig, world: World) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    elif world.distributed and world.device.type == "cpu":  # one OpenMP team per core share
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local))


def _run(recipe: Recipe, config: TrainConfig, world: World) -> Path:
    out = Path(config.out)
    _threads(config, world)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.resume and (out / METRICS).exists():
            (out / METRICS).unlink()  # a fresh run's metrics start afresh
        (out / "train_config.json").write_text(
            json.dumps({"recipe": recipe.name, **config.to_dict()}, indent=2) + "\n")
    distributed.barrier(world)
    torch.manual_seed(config.seed)
    ckpt, tokenizer = open_checkpoint(config.model, dtype="float32")
    fmt = chat_format(tokenizer)
    examples, stats = recipe.load(config.data, fmt, tokenizer, config)
    if config.val_data:
        train, validation = examples, recipe.load(config.val_data, fmt, tokenizer, config)[0]
    else:
        train, validation = split(examples, config.val_fraction, config.seed)
    if world.main:
        tqdm.write(f"data: {stats.summary()}; {len(train)} to train on, "
                   f"{len(validation)} held out")
    model = prepare_model(ckpt, config, world, recipe)
    trainer = Trainer(model, config, world, out, recipe.objective(config),
                      trains_all=not config.lora)
    if world.main:
        tqdm.write(f"{recipe.name}: training {sum(p.numel() for p in trainer.params):,} "
                   f"parameters{' (LoRA)' if config.lora else ''} in {trainer.precision} on "
                   f"{world.size} process{'es' if world.distributed else ''}")
    recipe.start(trainer, train, validation)
    before = recipe.evaluate(trainer, validation) if validation and not config.resume else None
    metrics = recipe.fit(trainer, train, validation)
    export(model, ckpt, tokenizer, config, out, world, recipe)
    if world.main:
        summary: dict[str, Any] = {"recipe": recipe.name, "steps": trainer.step,
                                   "data": stats.summary()}
        for key, value in (before or {}).items():
            summary[f"eval_{key}_before"] = value
        evals = [row for row in metrics if any(k.startswith("eval_") for k in row)]
        for key, value in (evals[-1] if evals else {}).items():
            if key.startswith("eval_"):
                summary[f"{key}_after"] = value
        if metrics:
            summary["tokens_per_s"] = metrics[-1]["tokens_per_s"]
            summary["train_s"] = metrics[-1]["elapsed_s"]
        summary.update(recipe.summary())
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_metrics(out / METRICS, out / "loss.png")
        tqdm.write(f"wrote {out}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                else f"{k} {v}" for k, v in summary.items()))
    return out
