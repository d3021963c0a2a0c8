"""Training losses as small functions: each takes the model and a batch and returns a sum to be
normalized by the trainer."""

from llamaherd.train.losses.cross_entropy import linear_cross_entropy
from llamaherd.train.losses.sft import sft_loss

__all__ = ["linear_cross_entropy", "sft_loss"]
