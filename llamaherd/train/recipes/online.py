"""Online post-training: GRPO and PPO (Llama 2's recipe), with rollouts drawn by the engine.

    llamaherd train grpo --data prompts.jsonl --out tuned --verifier math [--group-size 8]
    llamaherd train ppo  --data prompts.jsonl --out tuned --reward-model rm [--kl-coef 0.01]

Every step: the step's prompts are answered `group_size` times each by the engine running a
packed (Q8_0) copy of the current policy (llamaherd.train.rollout); each answer is judged by the
verifier or reward model; the policy takes one optimizer step on the answers; the engine is
refreshed from the updated weights (its cost is logged as refresh_s).

- GRPO: each answer's advantage is its reward against its group's mean over the group's standard
  deviation, the same for all its tokens; loss per token: PPO's clipped surrogate plus kl_coef
  times an estimate of KL(policy || reference).
- PPO: a value head on the policy's final hidden states; per-token rewards
  -kl_coef * (log pi - log pi_ref), plus the judged reward R_c on the last token (Llama 2's
  R = R_c - beta KL); GAE (gamma 1, lambda gae_lambda) gives advantages (whitened over the batch)
  and returns; loss: clipped surrogate plus value_coef times the clipped value loss.

One update is taken per batch of rollouts (on-policy: the ratio is 1 when the loss is taken, so
the clip bounds nothing; it is kept for exactness of form), and the loss is averaged over the
answers' tokens. The reference is the starting model: with LoRA the base model (adapters off),
else a frozen float copy. Validation: the mean reward of greedy answers to held-out prompts.
Online recipes run on one process.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaherd.chat import ChatFormat, build_prompt
from llamaherd.checkpoint import Checkpoint
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataStats
from llamaherd.train.lora import adapters_disabled
from llamaherd.train.losses.logprobs import trained_log_probs
from llamaherd.train.losses.policy import (
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_penalty,
)
from llamaherd.train.packing import pack
from llamaherd.train.recipes.common import Recipe, run_recipe
from llamaherd.train.recipes.dpo import formatting_ids
from llamaherd.train.rejection import (
    Judge,
    greedy_reward,
    make_judge,
    prompt_messages,
    read_prompt_rows,
)
from llamaherd.train.reward_model import add_score_head
from llamaherd.train.rollout import PolicyEngine, Rollout, make_rollout
from llamaherd.train.trainer import Objective, Trainer

VALUE = "value"  # PPO's value head on the policy


def per_token(rollouts: Sequence[Rollout], owner: torch.Tensor, field: str) -> torch.Tensor:
    """A per-token field of the rollouts (each (trained,)) laid out as the packed trained tokens
    (owner says whose each token is; each rollout's tokens come in its own order)."""
    out = torch.empty(len(owner), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        values = getattr(r, field)
        out[owner == i] = values
    return out


@dataclass
class PolicyObjective:
    """The per-token loss of GRPO or PPO summed over the answers' trained tokens."""

    max_len: int
    method: str  # "grpo" or "ppo"
    epsilon: float = 0.2
    kl_coef: float = 0.01
    value_coef: float = 0.1

    def loss(self, model: nn.Module, rollouts: Sequence[Rollout]) -> torch.Tensor:
        width = max(self.max_len, max(len(r) for r in rollouts))
        tokens = trained_log_probs(model, pack(rollouts, width))
        logp, owner = tokens.logp, tokens.owner
        old = logp.detach()  # one update per rollout batch: the policy that sampled them
        if self.method == "grpo":
            adv = torch.tensor([r.advantage for r in rollouts])[owner]
            loss = clipped_surrogate(logp, old, adv, self.epsilon)
            if self.kl_coef:
                loss = loss + self.kl_coef * kl_penalty(logp, per_token(rollouts, owner,
                                                                        "ref_logps"))
            return loss.sum()
        adv = per_token(rollouts, owner, "advantages")
        values = getattr(model, VALUE)(tokens.hidden.to(getattr(model, VALUE).weight.dtype))
        value_loss = clipped_value_loss(values.float()[:, 0], per_token(rollouts, owner, "values"),
                                        per_token(rollouts, owner, "returns"), self.epsilon)
        return (clipped_surrogate(logp, old, adv, self.epsilon)
                + self.value_coef * value_loss).sum()

    def count(self, rollouts: Sequence[Rollout]) -> int:
        return sum(r.trained for r in rollouts)

    def tokens(self, rollouts: Sequence[Rollout]) -> int:
        return sum(len(r) for r in rollouts)


class Online(Recipe):
    """GRPO or PPO (see the module docstring)."""

    def __init__(self, method: str) -> None:
        if method not in ("grpo", "ppo"):
            raise ValueError(f"unknown online method {method!r}")
        self.name = method
        self.engine: PolicyEngine | None = None
        self.reference: nn.Module | None = None
        self.judge: Judge | None = None
        self.fmt: ChatFormat | None = None
        self.tokenizer: Tokenizer | None = None
        self.config: TrainConfig | None = None
        self.rollout_s = 0.0

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        if config.verifier is None and config.reward_model is None:
            raise ValueError(f"{self.name} needs a verifier or a reward model to judge answers")
        self.fmt, self.tokenizer, self.config = fmt, tokenizer, config
        rows = read_prompt_rows(path)
        return rows, DataStats(rows=len(rows))

    def objective(self, config: TrainConfig) -> Objective:
        return PolicyObjective(config.max_len, self.name, config.clip_epsilon, config.kl_coef,
                               config.value_coef)

    def extend(self, model: nn.Module, ckpt: Checkpoint, config: TrainConfig) -> None:
        if self.name == "ppo":
            head = add_score_head(model, seed=config.seed, name=VALUE)
            with torch.no_grad():
                head.weight.zero_()  # values start at 0: the first advantages are the rewards
        lora = config.lora_config() if config.lora else None
        self.engine = PolicyEngine(ckpt.args, self.tokenizer,  # type: ignore[arg-type]
                                   lora.alpha / lora.rank if lora else None)
        if config.kl_coef and not config.lora:  # the frozen starting model
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def unfreeze(self, model: nn.Module) -> None:
        if self.name == "ppo":
            getattr(model, VALUE).weight.requires_grad_(True)

    def exported(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.startswith(f"{VALUE}.")}

    def start(self, trainer: Trainer, train: Sequence[Any], validation: Sequence[Any]) -> None:
        if trainer.world.distributed:
            raise ValueError(f"{self.name} runs on one process (its rollouts come from one "
                             "engine); start it without torchrun")
        c = self.config
        assert c is not None and self.engine is not None
        self.judge = make_judge(c.verifier, c.reward_model)
        self.engine.refresh(trainer.model)

    # ---- rollouts --------------------------------------------------------------------------------
    def prompt_ids(self, rows: Sequence[dict[str, Any]]) -> list[list[int]]:
        assert self.fmt is not None
        return [build_prompt(self.fmt, prompt_messages(r)) for r in rows]

    def answers(self, rows: Sequence[dict[str, Any]], n: int, **sampling: Any
                ) -> tuple[list[list[int]], list[Any]]:
        assert self.engine is not None and self.config is not None
        ids = self.prompt_ids(rows)
        done = self.engine.sample(ids, n=n, max_new_tokens=self.config.max_new_tokens,
                                  **sampling)
        return ids, done

    @torch.no_grad()
    def draw(self, trainer: Trainer, rows: list[dict[str, Any]]
             ) -> tuple[list[Rollout], dict[str, float]]:
        """The step's rollouts: group_size answers to each prompt, judged, with advantages."""
        c, judge = self.config, self.judge
        assert c is not None and judge is not None and self.fmt is not None
        started = time.perf_counter()
        ids, done = self.answers(rows, c.group_size, temperature=c.temperature,
                                 seed=c.seed * 1_000_003 + trainer.step * 1009)
        stops = formatting_ids(self.fmt, self.tokenizer)  # type: ignore[arg-type]
        rollouts = [make_rollout(ids[comp.prompt_index], comp, stops, comp.prompt_index)
                    for comp in done]
        rollouts = [r for r in rollouts if r.trained]  # an empty answer has nothing to train
        rewards = judge([rows[r.prompt_index] for r in rollouts], [r.reply for r in rollouts])
        for r, reward in zip(rollouts, rewards, strict=True):
            r.reward = reward
        sampled = time.perf_counter() - started
        self.rollout_s += sampled
        if self.name == "grpo":
            full = len(rollouts) == len(done)  # groups intact: normalize within each
            scores = torch.tensor(rewards, dtype=torch.float32)
            adv = group_advantages(scores, c.group_size) if full else (
                (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-4))
            for r, a in zip(rollouts, adv.tolist(), strict=True):
                r.advantage = a
            if c.kl_coef:
                self.set_reference_logps(trainer, rollouts)
        else:
            self.set_ppo_targets(trainer, rollouts)
        return rollouts, {"reward": statistics.fmean(rewards),
                          "answer_tokens": statistics.fmean(r.trained for r in rollouts),
                          "rollout_s": sampled}

    def token_logps(self, trainer: Trainer, model: nn.Module, rollouts: Sequence[Rollout],
                    values: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each rollout's per-token log-probabilities under `model` (and value estimates)."""
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        model.eval()
        for group in trainer.by_tokens(list(rollouts)):
            with trainer.autocast():
                t = trained_log_probs(model, pack(group, max(self._width(group), 1)))
                v = (getattr(model, VALUE)(t.hidden.to(getattr(model, VALUE).weight.dtype))
                     .float()[:, 0] if values else None)
            for i in range(len(group)):
                mine = t.owner == i
                out.append((t.logp[mine].float(), v[mine] if v is not None else None))
        return out

    def _width(self, rollouts: Sequence[Rollout]) -> int:
        assert self.config is not None
        return max(self.config.max_len, max(len(r) for r in rollouts))

    def reference_logps(self, trainer: Trainer, rollouts: Sequence[Rollout]
                        ) -> list[torch.Tensor]:
        if self.reference is not None:
            return [lp for lp, _ in self.token_logps(trainer, self.reference, rollouts)]
        with adapters_disabled(trainer.model):  # LoRA: the base model
            return [lp for lp, _ in self.token_logps(trainer, trainer.model, rollouts)]

    def set_reference_logps(self, trainer: Trainer, rollouts: Sequence[Rollout]) -> None:
        for r, lp in zip(rollouts, self.reference_logps(trainer, rollouts), strict=True):
            r.ref_logps = lp

    def set_ppo_targets(self, trainer: Trainer, rollouts: Sequence[Rollout]) -> None:
        """Llama 2's per-token rewards, the value estimates, GAE advantages (whitened over the
        batch) and returns."""
        c = self.config
        assert c is not None
        current = self.token_logps(trainer, trainer.model, rollouts, values=True)
        refs = self.reference_logps(trainer, rollouts) if c.kl_coef else [
            lp for lp, _ in current]
        advantages = []
        for r, (lp, v), ref in zip(rollouts, current, refs, strict=True):
            rewards = -c.kl_coef * (lp - ref)
            rewards[-1] += r.reward
            assert v is not None
            r.advantages, r.returns = gae(rewards, v, 1.0, c.gae_lambda)
            r.values = v
            advantages.append(r.advantages)
        every = torch.cat(advantages)
        mean, std = every.mean(), every.std(unbiased=False) + 1e-8
        for r in rollouts:
            r.advantages = (r.advantages - mean) / std  # type: ignore[operator]

    # ---- training --------------------------------------------------------------------------------
    def fit(self, trainer: Trainer, train: Sequence[Any], validation: Sequence[Any]
            ) -> list[dict[str, Any]]:
        assert self.engine is not None
        return trainer.fit(train, validation,
                           draw=lambda rows: self.draw(trainer, rows),
                           evaluate=lambda rows: self.evaluate(trainer, rows),
                           after_step=lambda: {"refresh_s": self.engine.refresh(trainer.model)})

    def evaluate(self, trainer: Trainer, validation: Sequence[Any]) -> dict[str, float]:
        """The mean reward of the engine's greedy answers to the held-out prompts."""
        assert self.judge is not None and self.engine is not None and self.config is not None
        return {"reward": greedy_reward(self.engine.llm, validation, self.judge,
                                        self.config.max_new_tokens)}

    def summary(self) -> dict[str, Any]:
        refreshes = self.engine.refreshes if self.engine else []
        return {"rollout_s": self.rollout_s,
                "refresh_s_mean": statistics.fmean(refreshes) if refreshes else 0.0}


def grpo(config: TrainConfig) -> Path:
    """Run GRPO as `config` says; returns the output directory."""
    return run_recipe(Online("grpo"), config)


def ppo(config: TrainConfig) -> Path:
    """Run PPO (Llama 2's recipe) as `config` says; returns the output directory."""
    return run_recipe(Online("ppo"), config)
