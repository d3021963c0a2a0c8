"""Training checkpoints: weights (or adapters), optimizer, schedule, RNG and data position.

Weights and optimizer state go through torch.distributed.checkpoint's distributed state dicts, so
every process writes its own shards and a run can resume on another number of processes. A
checkpoint is written to `step-N.tmp` and renamed into place once complete, so a run killed while
writing one resumes from the one before.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from llamaherd.train.distributed import World, barrier

TRAINER_STATE = "trainer.pt"


def _options(frozen: bool) -> StateDictOptions:
    # LoRA runs save the adapters alone: the frozen base weights are the model's own
    return StateDictOptions(ignore_frozen_params=not frozen)


@contextlib.contextmanager
def _one_process_quietly(world: World) -> Iterator[None]:
    """torch.distributed.checkpoint warns that it assumes one process when there is no process
    group: here that is the intent."""
    with warnings.catch_warnings():
        if not world.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any], world: World, frozen: bool = True) -> Path:
    """Write a checkpoint into `directory` (every process calls this). `trainer_state` holds the
    step, data position and schedule; `frozen`: also save parameters that do not train."""
    tmp = directory.with_name(directory.name + ".tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(frozen))
    with _one_process_quietly(world):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-{world.rank}.pt")
    if world.main:
        torch.save({**trainer_state, "world_size": world.size}, tmp / TRAINER_STATE)
    barrier(world)
    if world.main:
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    barrier(world)
    return directory


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
         frozen: bool = True) -> dict[str, Any]:
    """Restore a checkpoint written by `save` (by any number of processes); returns its
    trainer state. This process's RNG state is restored when the checkpoint has one for its
    rank (the same number of processes resumes bit for bit)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(frozen))
    state = {"model": model_state, "optim": optim_state}
    with _one_process_quietly(world):
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_options(frozen))
    rng = directory / f"rng-{world.rank}.pt"
    trainer_state = torch.load(directory / TRAINER_STATE, weights_only=False)
    if rng.exists() and trainer_state.get("world_size") == world.size:
        set_rng_state(torch.load(rng, weights_only=False))
    return trainer_state


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run's output directory, or None."""
    root = out / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / TRAINER_STATE).exists()) if root.is_dir() else []
    return done[-1] if done else None


def prune(out: Path, keep: int, world: World) -> None:
    """Delete all but the newest `keep` checkpoints."""
    if not world.main or keep < 1:
        return
    root = out / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
