"""Several training processes (torchrun): the process group, and FSDP2 applied after the model is
built, as a plan rather than inside its layers.

One process runs the plain model. Under `torchrun --nproc_per_node N` every process joins one
group (gloo on a CPU, nccl on GPUs), each block is sharded with `fully_shard` and then the root,
so every process holds 1/N of the weights, gradients and optimizer state and gathers a block's
weights only while it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Whether this process writes logs, metrics and the exported model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init() -> World:
    """This process's place: from torchrun's environment (joining the process group), else one
    process alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, device)


def shard(model: nn.Module, world: World) -> nn.Module:
    """FSDP2 over `model` when there are several processes: each block, then the root. The
    model's hidden_states method gathers and frees weights as forward does."""
    if not world.distributed:
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def all_sum(value: float, world: World) -> float:
    """The sum of `value` over every process."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t.item())


def all_union(keys: set[str], world: World) -> list[str]:
    """The sorted union of every process's `keys` (so that all reduce the same values)."""
    if not world.distributed:
        return sorted(keys)
    gathered: list[set[str] | None] = [None] * world.size
    dist.all_gather_object(gathered, keys)
    return sorted(set().union(*(g or set() for g in gathered)))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World, failed: bool = False) -> None:
    """Leave the process group: after a run, every process together (a process that left while
    another was still writing files could take gloo's connections down under it); after a
    failure, at once."""
    if world.distributed and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
