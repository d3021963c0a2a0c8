"""The reward model's ranking loss against hand-computed values, and the last-token scores of
packed sequences against each sequence run alone."""

from __future__ import annotations

import math

import pytest
import torch

from llamaherd.train.data import Example
from llamaherd.train.losses import last_token_scores, ranking_loss
from llamaherd.train.packing import pack
from llamaherd.train.reward_model import add_score_head
from tests.support.models import make_tiny_model


def test_ranking_loss_hand_computed() -> None:
    # -log sigmoid(2 - 0.5 - 1) = log(1 + e^-0.5)
    loss = ranking_loss(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    # no margin (Llama 3); equal rewards cost log 2
    assert ranking_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(
        math.log(2))
    # a larger margin asks more of the same pair
    assert ranking_loss(torch.tensor([2.0]), torch.tensor([0.5]), 3.0).item() > loss.item()


def test_packed_scores_equal_each_sequence_alone() -> None:
    model = make_tiny_model()
    head = add_score_head(model, seed=3)
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    examples = [Example(s, [True] * len(s), "t") for s in seqs]
    batch = pack(examples, max_len=7)  # three rows: [4+2], [3], [5]
    assert batch.tokens.shape[0] == 3
    scores = last_token_scores(model, head, batch, len(seqs))
    for i, s in enumerate(seqs):
        alone = head(model.hidden_states(torch.tensor([s]))[0, -1])
        assert scores[i].item() == pytest.approx(alone.item(), abs=1e-5)
