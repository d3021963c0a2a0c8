"""The log-probability of every trained token of a packed batch, with whose it is: what DPO sums
per sequence and what PPO and GRPO weigh token by token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamaherd.model import Transformer
from llamaherd.train.losses.cross_entropy import linear_log_probs
from llamaherd.train.packing import IGNORE, Batch


@dataclass
class TokenLogProbs:
    """Over the batch's trained tokens, in packed (row-major) order, which is each sequence's
    own order: an example's tokens sit together in one row."""

    logp: torch.Tensor  # (N,) float32, differentiable
    targets: torch.Tensor  # (N,) the token ids
    owner: torch.Tensor  # (N,) the index of the sequence each belongs to
    hidden: torch.Tensor  # (N, dim) the final hidden state that predicts it (for a value head)


def trained_log_probs(model: Transformer, batch: Batch) -> TokenLogProbs:
    h = model.hidden_states(batch.tokens, batch.positions, documents=batch.documents)
    keep = batch.targets != IGNORE
    targets, hidden = batch.targets[keep], h[keep]
    return TokenLogProbs(linear_log_probs(hidden, model.output.weight, targets), targets,
                         batch.sequences[keep], hidden)
