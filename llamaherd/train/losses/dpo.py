"""Direct preference optimization (Rafailov et al. 2023) with Llama 3's additions: formatting
tokens left out of the log-probabilities, and an NLL term on the chosen answer."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamaherd.model import Transformer
from llamaherd.train.losses.logprobs import trained_log_probs
from llamaherd.train.packing import Batch


@dataclass
class SequenceLogProbs:
    """Per-sequence sums over a packed batch's trained tokens (each (S,) float32)."""

    scored: torch.Tensor  # log-probability of the tokens that are not formatting tokens
    trained: torch.Tensor  # log-probability of every trained token
    count: torch.Tensor  # how many trained tokens


def sequence_log_probs(model: Transformer, batch: Batch, n_sequences: int,
                       formatting: Collection[int] = ()) -> SequenceLogProbs:
    """Sum each packed sequence's token log-probabilities: over its trained tokens, and over
    those of them that are not in `formatting` (end-of-turn and end-of-text ids; the headers are
    never trained tokens)."""
    tokens = trained_log_probs(model, batch)
    logp, targets, owner = tokens.logp, tokens.targets, tokens.owner
    scored = ~torch.isin(targets, torch.tensor(sorted(formatting), dtype=targets.dtype))
    zeros = torch.zeros(n_sequences, dtype=torch.float32)
    return SequenceLogProbs(
        scored=zeros.index_add(0, owner[scored], logp[scored]),
        trained=zeros.index_add(0, owner, logp),
        count=zeros.index_add(0, owner, torch.ones_like(logp)))


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Per pair: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), for
    the policy's and the reference's sequence log-probabilities."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
