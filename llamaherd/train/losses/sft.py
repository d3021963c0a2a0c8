"""The supervised fine-tuning loss: next-token negative log-likelihood on the trained tokens."""

from __future__ import annotations

import torch

from llamaherd.model import Transformer
from llamaherd.train.losses.cross_entropy import linear_cross_entropy
from llamaherd.train.packing import IGNORE, Batch


def sft_loss(model: Transformer, batch: Batch) -> torch.Tensor:
    """The summed NLL of every trained token of a packed batch (divide by the trained-token count
    of the whole optimizer step for the mean). The output projection runs only at the positions
    that predict a trained token."""
    h = model.hidden_states(batch.tokens, batch.positions, documents=batch.documents)
    keep = batch.targets != IGNORE
    return linear_cross_entropy(h[keep], model.output.weight, batch.targets[keep])
