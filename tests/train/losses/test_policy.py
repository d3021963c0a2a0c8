"""PPO and GRPO's losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llamaherd.train.losses.policy import (
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_penalty,
)


def test_clipped_surrogate_by_hand() -> None:
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))  # ratios 1, 1.5, 0.5, 1.5
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    loss = clipped_surrogate(logp, old, adv, epsilon=0.2)
    # ratio 1: -A; 1.5 with A>0: clipped to 1.2; 0.5 with A<0: clipped to 0.8 -> -(-0.8) = 0.8
    # 1.5 with A<0: min(-1.5, -1.2) = -1.5 -> 1.5 (the pessimistic side is unclipped)
    assert loss.tolist() == pytest.approx([-2.0, -1.2, 0.8, 1.5], abs=1e-6)


def test_surrogate_gradient_at_ratio_one_is_minus_advantage() -> None:
    logp = torch.tensor([-1.3, -0.2], requires_grad=True)
    adv = torch.tensor([0.7, -2.0])
    clipped_surrogate(logp, logp.detach(), adv).sum().backward()
    assert logp.grad.tolist() == pytest.approx([-0.7, 2.0])


def test_kl_penalty_by_hand() -> None:
    kl = kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]))
    # delta 0 -> 0; delta 1 -> e - 2
    assert kl.tolist() == pytest.approx([0.0, math.e - 2], abs=1e-6)


def test_value_loss_by_hand() -> None:
    loss = clipped_value_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5]),
                              torch.tensor([0.0, 2.0]), epsilon=0.2)
    # first: max(1^2, (0.2 - 0)^2) / 2 = 0.5; second: max(1.5^2, 1.5^2) / 2 = 1.125
    assert loss.tolist() == pytest.approx([0.5, 1.125])


def test_gae_by_hand() -> None:
    rewards = torch.tensor([0.0, 0.0, 1.0])
    values = torch.tensor([0.5, 0.25, 0.5])
    adv, ret = gae(rewards, values, gamma=1.0, lam=0.5)
    # deltas: 0 + 0.25 - 0.5 = -0.25; 0 + 0.5 - 0.25 = 0.25; 1 + 0 - 0.5 = 0.5
    # A2 = 0.5; A1 = 0.25 + 0.5 * 0.5 = 0.5; A0 = -0.25 + 0.5 * 0.5 = 0
    assert adv.tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert ret.tolist() == pytest.approx([0.5, 0.75, 1.0])
    # lambda 1, gamma 1: every advantage is the final reward minus the value
    adv, _ = gae(rewards, values, gamma=1.0, lam=1.0)
    assert adv.tolist() == pytest.approx([0.5, 0.75, 0.5])


def test_group_advantages_by_hand() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), group_size=3)
    mean, std = 2 / 3, math.sqrt(2 / 9)
    assert adv[:3].tolist() == pytest.approx([(1 - mean) / (std + 1e-4), -mean / (std + 1e-4),
                                              (1 - mean) / (std + 1e-4)], rel=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # a group that agrees teaches nothing
