"""Single-kernel replacements for the model's small ops on the fast inference path."""

from __future__ import annotations

import torch
from torch import nn

from llamaherd.model import RMSNorm
from llamaherd.quant import kernels


class KernelRMSNorm(nn.Module):
    """RMSNorm computed by one C++ call (the composed torch version is a dozen small ops)."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return kernels.load().rms_norm(x, self.weight, self.eps)


def use_kernel_norms(model: nn.Module) -> int:
    """Swap every RMSNorm for KernelRMSNorm when the C++ kernels are available; returns how many."""
    if not kernels.available():
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, RMSNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, KernelRMSNorm(module))
            swapped += 1
    return swapped
