"""`llamaherd train sft`: post-training from the command line (the same under torchrun)."""

from __future__ import annotations

from typing import Any

import click

from llamaherd.cli.common import friendly
from llamaherd.hub import DEFAULT_MODEL


@click.group()
def train() -> None:
    """Post-train a model: supervised fine-tuning (full or LoRA), on one process or under
    torchrun."""


@train.command()
@click.option("--model", default=None, help=f"Base model: a name, GGUF, HF or Meta directory "
                                            f"(default {DEFAULT_MODEL}).")
@click.option("--data", default=None, help="Training JSONL: messages, prompt/completion or text.")
@click.option("--out", default=None, help="Output directory.")
@click.option("--config", "config_file", default=None,
              help="TOML or JSON file with any TrainConfig setting; flags override it.")
@click.option("--val-data", default=None, help="Validation JSONL (default: a share of --data).")
@click.option("--lora/--full", default=None, help="LoRA adapters or every weight.")
@click.option("--lora-rank", type=int, default=None)
@click.option("--steps", type=int, default=None, help="Optimizer steps.")
@click.option("--epochs", type=float, default=None, help="Passes over the data (default 1).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (2e-5; 2e-4 LoRA).")
@click.option("--batch-size", type=int, default=None,
              help="Examples per optimizer step, across all processes (default 8).")
@click.option("--grad-accum", type=int, default=None, help="Micro-steps per optimizer step.")
@click.option("--max-len", type=int, default=None, help="Tokens per packed row (default 512).")
@click.option("--micro-tokens", type=int, default=None,
              help="Tokens per forward/backward pass (default 512): bounds activation memory.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bf16"]), default=None,
              help="bf16 autocast, float32, or auto (bf16 where the CPU has it).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--save-every", type=int, default=None, help="Steps between checkpoints.")
@click.option("--eval-every", type=int, default=None, help="Steps between validation losses.")
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=int, default=None, help="torch threads per process.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue from the newest checkpoint in --out.")
@friendly
def sft(config_file: str | None, **flags: Any) -> None:
    """Supervised fine-tuning: loss on the assistant's turns, examples packed into rows."""
    from llamaherd.train import TrainConfig
    from llamaherd.train.recipes.sft import sft as run

    settings = {k: v for k, v in flags.items() if v is not None}
    config = (TrainConfig.from_file(config_file, **settings) if config_file
              else TrainConfig.make(**settings))
    if not config.data or not config.out:
        raise click.UsageError("--data and --out are required (or set in --config)")
    run(config)
