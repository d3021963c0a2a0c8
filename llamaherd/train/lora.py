"""LoRA: low-rank adapters swapped in for a model's linear layers, merged back on export.

`y = W x + (alpha / r) B A dropout(x)` with A Kaiming-uniform and B zero, so training starts from
the base model exactly. A small module swap rather than peft: peft wraps the whole model in its
own classes and imports transformers and accelerate, while the trainer here needs the model's own
module tree (FSDP2 wraps its blocks, checkpoints keep its parameter names, DPO turns adapters off
for the reference model); tests check this layer against peft's on the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Every linear layer of a block: attention q, k, v, o and the feed-forward's gate, down, up.
ALL_LINEAR = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR  # module names (the last part of the path)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(ALL_LINEAR)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be among {', '.join(ALL_LINEAR)}; "
                             f"got {', '.join(sorted(unknown)) or 'none'}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True
        base.weight.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.lora_b(self.lora_a(self.dropout(x))) * self.scale

    def merged(self) -> nn.Linear:
        """A plain linear layer computing what this one computes (dropout off)."""
        with torch.no_grad():
            delta = (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scale
            weight = self.base.weight.float() + delta
        out = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        out.weight = nn.Parameter(weight.to(self.base.weight.dtype))
        return out


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and swap each targeted nn.Linear for a LoRALinear (its
    adapter the only trainable part); returns the swapped modules' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets:
            model.set_submodule(name, LoRALinear(module, config.rank, config.alpha,
                                                 config.dropout))
            swapped.append(name)
    if not swapped:
        raise ValueError(f"no linear layer named {', '.join(config.targets)} to adapt")
    return swapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by the plain linear layer it computes; returns how many."""
    layers = list(lora_layers(model))
    for name, layer in layers:
        model.set_submodule(name, layer.merged())
    return len(layers)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone, under the model's own parameter names."""
    return {name: p.detach() for name, p in model.state_dict().items()
            if ".lora_a." in name or ".lora_b." in name}


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict of an adapted model with each adapter folded into its base weight,
    under the plain model's parameter names (what merge_lora does to the modules)."""
    out = {}
    for name, t in state.items():
        if ".lora_a." in name or ".lora_b." in name:
            continue
        if name.endswith(".base.weight"):
            prefix = name[:-len(".base.weight")]
            a, b = state[f"{prefix}.lora_a.weight"], state[f"{prefix}.lora_b.weight"]
            out[f"{prefix}.weight"] = (t.float() + scale * (b.float() @ a.float())).to(t.dtype)
        else:
            out[name] = t
    return out


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter off inside the block (DPO's reference model)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def trainable_parameters(model: nn.Module) -> Sequence[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
