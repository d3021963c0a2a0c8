"""The supervised fine-tuning recipe: a chat JSONL in, a model directory that loads, runs and
serves out.

    llamaherd train sft --model smollm2-135m-instruct --data chats.jsonl --out tuned [--lora]
    torchrun --nproc_per_node 2 -m llamaherd.cli train sft ...     (the same run on 2 processes)

The output directory holds the model in Hugging Face form (config.json, model.safetensors, the
tokenizer files and chat template; LoRA adapters merged, and also kept in adapter.safetensors),
`metrics.jsonl`, `loss.png`, `train_config.json` and `checkpoints/`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from llamaherd.api import open_checkpoint
from llamaherd.chat import chat_format
from llamaherd.checkpoint import Checkpoint
from llamaherd.checkpoint.hf import save_hf
from llamaherd.convert import write_vocabulary
from llamaherd.tokenizer import Tokenizer
from llamaherd.train import distributed
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import Example, load_examples, split
from llamaherd.train.distributed import World
from llamaherd.train.lora import apply_lora, merged_state_dict
from llamaherd.train.losses import sft_loss
from llamaherd.train.packing import pack
from llamaherd.train.plot import plot_metrics
from llamaherd.train.trainer import METRICS, Trainer


@dataclass
class SFTObjective:
    """Next-token NLL over the trained tokens of examples packed into rows of max_len."""

    max_len: int

    def loss(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        return sft_loss(model, pack(examples, self.max_len))

    def count(self, examples: Sequence[Example]) -> int:
        return sum(e.trained for e in examples)

    def tokens(self, examples: Sequence[Example]) -> int:
        return sum(len(e) for e in examples)


def prepare_model(ckpt: Checkpoint, config: TrainConfig, world: World) -> nn.Module:
    """The float32 model in training form: adapters swapped in, blocks checkpointed, sharded."""
    model = ckpt.model.float().to(world.device)
    if config.lora:
        apply_lora(model, config.lora_config())
    if config.gradient_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    return distributed.shard(model.train(), world)


def export(model: nn.Module, ckpt: Checkpoint, tokenizer: Tokenizer, config: TrainConfig,
           out: Path, world: World) -> None:
    """Write the trained model into `out` as a Hugging Face directory (every process takes part
    in gathering the weights; the first writes)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
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


def sft(config: TrainConfig) -> Path:
    """Run supervised fine-tuning as `config` says; returns the output directory."""
    if not config.data or not config.out:
        raise ValueError("sft needs data (a JSONL file) and out (a directory)")
    world = distributed.init()
    try:
        out = _run(config, world)
    except BaseException:
        distributed.close(world, failed=True)
        raise
    distributed.close(world)
    return out


def _run(config: TrainConfig, world: World) -> Path:
    out = Path(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    elif world.distributed and world.device.type == "cpu":  # one OpenMP team per core share
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local))
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.resume and (out / METRICS).exists():
            (out / METRICS).unlink()  # a fresh run's metrics start afresh
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    distributed.barrier(world)
    torch.manual_seed(config.seed)
    ckpt, tokenizer = open_checkpoint(config.model, dtype="float32")
    fmt = chat_format(tokenizer)
    examples, stats = load_examples(config.data, fmt, tokenizer, config.max_len, config.overlong)
    if config.val_data:
        train, validation = examples, load_examples(config.val_data, fmt, tokenizer,
                                                    config.max_len, config.overlong)[0]
    else:
        train, validation = split(examples, config.val_fraction, config.seed)
    if world.main:
        tqdm.write(f"data: {stats.summary()}; {len(train)} to train on, "
                   f"{len(validation)} held out")
    model = prepare_model(ckpt, config, world)
    trainer = Trainer(model, config, world, out, SFTObjective(config.max_len),
                      trains_all=not config.lora)
    if world.main:
        tqdm.write(f"training {sum(p.numel() for p in trainer.params):,} parameters"
                   f"{' (LoRA)' if config.lora else ''} in {trainer.precision} on "
                   f"{world.size} process{'es' if world.distributed else ''}")
    start_loss = trainer.evaluate(validation) if validation and not config.resume else None
    metrics = trainer.fit(train, validation)
    export(model, ckpt, tokenizer, config, out, world)
    if world.main:
        summary: dict[str, Any] = {"steps": trainer.step, "data": stats.summary()}
        if start_loss is not None:
            summary["eval_loss_before"] = start_loss
        if metrics and "eval_loss" in metrics[-1]:
            summary["eval_loss_after"] = metrics[-1]["eval_loss"]
        if metrics:
            summary["tokens_per_s"] = metrics[-1]["tokens_per_s"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_metrics(out / METRICS, out / "loss.png")
        tqdm.write(f"wrote {out}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                else f"{k} {v}" for k, v in summary.items()))
    return out

