"""The reward model's ranking loss (Llama 2): the chosen answer's reward above the rejected one's
by at least the pair's margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.model import Transformer
from llamaherd.train.packing import Batch


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                 margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


def last_token_scores(model: Transformer, head: nn.Module, batch: Batch,
                      n_sequences: int) -> torch.Tensor:
    """The scalar head on each packed sequence's final hidden state: (S,) float32, in the order
    of the sequences packed."""
    return last_token_outputs(model, head, batch, n_sequences)[:, 0]


def last_token_outputs(model: Transformer, head: nn.Module, batch: Batch,
                       n_sequences: int) -> torch.Tensor:
    """The head on each packed sequence's final hidden state: (S, outputs) float32, in the order
    of the sequences packed (a classifier's logits)."""
    h = model.hidden_states(batch.tokens, batch.positions, documents=batch.documents)
    rows, cols = (batch.sequences >= 0).nonzero(as_tuple=True)
    last = torch.full((n_sequences,), -1, dtype=torch.long)
    flat = rows * batch.sequences.shape[1] + cols
    last.scatter_reduce_(0, batch.sequences[rows, cols], flat, reduce="amax")
    picked = h.reshape(-1, h.shape[-1])[last]  # (S, dim)
    return head(picked.to(head.weight.dtype)).float()
