"""The losses of online policy optimization (PPO as in Llama 2, GRPO), token by token.

Each function takes per-token tensors (the trained tokens of sampled answers) and returns
per-token losses for the trainer to sum and average over tokens.
"""

from __future__ import annotations

import torch


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon: float = 0.2) -> torch.Tensor:
    """PPO's clipped objective, negated: -min(r A, clip(r, 1 - eps, 1 + eps) A) with the ratio
    r = exp(logp - old_logp). With a single update per rollout r = 1 and this is -A logp in
    gradient."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages,
                          ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """A per-token estimate of KL(pi || pi_ref) that is never negative (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       epsilon: float = 0.2) -> torch.Tensor:
    """PPO's value loss: 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-epsilon, epsilon)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over one answer's tokens: per-token rewards and value
    estimates (T,) -> (advantages, returns), the value after the last token taken as 0."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in range(len(rewards) - 1, -1, -1):
        following = values[t + 1] if t + 1 < len(rewards) else torch.zeros((), dtype=values.dtype)
        delta = rewards[t] + gamma * following - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward against its group's (the answers to one prompt) mean, over
    the group's standard deviation. rewards (P * G,) in groups of G consecutive answers."""
    grouped = rewards.reshape(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True, unbiased=False) if group_size > 1 else torch.ones_like(mean)
    return ((grouped - mean) / (std + eps)).reshape(-1)
