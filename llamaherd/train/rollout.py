"""Rollouts for online post-training: the policy's answers drawn through the inference engine,
on a packed copy of the policy's current weights that is refreshed after each update.

The trainer keeps the policy in float32 (its master weights); `PolicyEngine.refresh` quantizes
them to Q8_0 in memory, packs them for the C++ kernels and builds a fresh engine over them
(llamaherd.checkpoint.packed). Sampling then runs at the engine's speed (one prefill a prompt,
its cache rows copied to each of the group's samples) rather than at a float model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llamaherd.checkpoint.keymaps import HEADS
from llamaherd.config import ModelArgs
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.data import Example
from llamaherd.train.lora import merged_state_dict


@dataclass
class Rollout(Example):
    """A prompt and one sampled answer: the answer's tokens (and its end-of-turn token, where it
    stopped) are the trained ones. Per trained token: the reference model's log-probability (for
    the KL term) and PPO's targets. The sampling policy's own log-probabilities are not kept: one
    update is taken per batch of rollouts, so they are the current policy's, detached."""

    prompt_index: int = 0
    reply: str = ""
    reward: float = 0.0
    advantage: float = 0.0
    ref_logps: torch.Tensor | None = None  # (trained,)
    values: torch.Tensor | None = None  # PPO: the value head's estimates, (trained,)
    returns: torch.Tensor | None = None  # PPO: GAE returns, (trained,)
    advantages: torch.Tensor | None = None  # PPO: per-token advantages, (trained,)


def policy_state(model: nn.Module, lora_scale: float | None) -> dict[str, torch.Tensor]:
    """The policy's current weights under the Transformer's own names: adapters merged, heads
    (reward, value) left out."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if lora_scale is not None:
        state = merged_state_dict(state, lora_scale)
    return {k: v for k, v in state.items() if k not in HEADS}


class PolicyEngine:
    """The inference engine over the latest refreshed copy of a policy."""

    def __init__(self, args: ModelArgs, tokenizer: Tokenizer, lora_scale: float | None = None
                 ) -> None:
        self.args, self.tokenizer, self.lora_scale = args, tokenizer, lora_scale
        self.llm: Any = None
        self.refreshes: list[float] = []  # seconds each refresh took

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> float:
        """Rebuild the engine on the policy's current weights; returns the seconds it took."""
        from llamaherd.api import LLM
        from llamaherd.checkpoint import Checkpoint
        from llamaherd.checkpoint.packed import packed_model
        from llamaherd.runtime import prepare

        started = time.perf_counter()
        self.llm = None  # the old engine's memory goes first
        packed = packed_model(self.args, policy_state(model, self.lora_scale))
        self.llm = LLM(Checkpoint(packed, self.args, "memory", Path("<policy>")), self.tokenizer,
                       prepare(packed))
        seconds = time.perf_counter() - started
        self.refreshes.append(seconds)
        return seconds

    def sample(self, prompt_ids: list[list[int]], n: int, **sampling: Any) -> list[Any]:
        """n completions of each prompt (token ids), prompt by prompt."""
        if self.llm is None:
            raise RuntimeError("refresh the engine from the policy first")
        return self.llm.generate(prompt_ids, n=n, **sampling)


def make_rollout(prompt_ids: list[int], completion: Any, stop_ids: frozenset[int],
                 prompt_index: int) -> Rollout:
    """A Rollout of one engine Completion: the answer trained, with its stop token where the
    model ended its turn (so that stopping is learned too)."""
    answer = list(completion.token_ids)
    if completion.finish_reason == "stop" and isinstance(completion.stop_reason, int) and \
            completion.stop_reason in stop_ids:
        answer.append(completion.stop_reason)
    tokens = prompt_ids + answer
    labels = [False] * len(prompt_ids) + [True] * len(answer)
    return Rollout(tokens, labels, "rollout", prompt_index=prompt_index,
                   reply=completion.text.strip())
