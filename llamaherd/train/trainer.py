"""The training loop every recipe shares: batches, micro-steps, AdamW with warm-up and cosine
decay, clipping, mixed precision, checkpoints and resume, validation, metrics and progress.

A recipe gives an Objective: the summed loss of a list of examples and the count it is averaged
over (trained tokens for SFT). The loss of one optimizer step is the sum over the whole global
batch divided by the whole batch's count, however the batch is split across processes and
micro-steps, so that a run's losses do not depend on either.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from llamaherd.train import checkpoints
from llamaherd.train.config import TrainConfig
from llamaherd.train.distributed import World, all_sum, all_union
from llamaherd.train.packing import groups_of

METRICS = "metrics.jsonl"


class Objective(Protocol):
    def loss(self, model: nn.Module, examples: Sequence[Any]) -> torch.Tensor:
        """The summed loss of `examples` (a float32 scalar with gradients)."""
        ...

    def count(self, examples: Sequence[Any]) -> int:
        """What the loss is averaged over (e.g. trained tokens)."""
        ...

    def tokens(self, examples: Sequence[Any]) -> int:
        """Input tokens the examples hold (for throughput)."""
        ...


def measure(objective: Objective, model: nn.Module, examples: Sequence[Any]) -> dict[str, float]:
    """Validation sums of `examples`: the objective's own `measure` where it has one (a dict of
    sums that includes "loss", e.g. also pairwise accuracy), else its loss."""
    own = getattr(objective, "measure", None)
    if own is not None:
        return own(model, examples)
    return {"loss": float(objective.loss(model, examples))}


def bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line.split() for line in lines if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "float32"
    return "bf16" if bf16_cpu() else "float32"


def lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then a cosine from 1 down to min_ratio at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def split(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    """`items` in `parts` consecutive pieces of near-equal size (some may be empty)."""
    n, out, at = len(items), [], 0
    for i in range(parts):
        size = n // parts + (i < n % parts)
        out.append(items[at:at + size])
        at += size
    return out


@dataclass
class Position:
    """Where the data stands: the next batch is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


class Trainer:
    """Runs `config` over a model already built (and sharded) on every process."""

    def __init__(self, model: nn.Module, config: TrainConfig, world: World, out: Path,
                 objective: Objective, trains_all: bool = True) -> None:
        self.model, self.config, self.world, self.out = model, config, world, out
        self.objective = objective
        self.trains_all = trains_all  # False when frozen weights are left out of checkpoints
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameter")
        # the fused implementation: one kernel over every parameter rather than a loop of ops
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate,
                                           betas=config.betas,
                                           weight_decay=config.weight_decay, fused=True)
        self.precision = resolve_precision(config.precision, world.device)
        self.step = 0
        self.position = Position()
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # ---- data order ------------------------------------------------------------------------------
    def order(self, n: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def total_steps(self, n: int) -> int:
        c = self.config
        if c.steps is not None:
            return c.steps
        return max(1, math.ceil((c.epochs or 1.0) * n / c.batch_size))

    def batches(self, examples: Sequence[Any]) -> Iterator[list[Any]]:
        """Global batches from the current position on, epoch after epoch."""
        size = self.config.batch_size
        per_epoch = math.ceil(len(examples) / size)
        while True:
            order = self.order(len(examples), self.position.epoch)
            while self.position.batch < per_epoch:
                b = self.position.batch
                self.position.batch += 1  # before handing the batch out: a checkpoint taken
                yield [examples[i] for i in order[b * size:(b + 1) * size]]  # after it skips it
            self.position = Position(self.position.epoch + 1, 0)

    def by_tokens(self, examples: Sequence[Any]) -> list[Sequence[Any]]:
        """Consecutive groups of examples of at most micro_tokens tokens (an example longer than
        that alone), so that one forward's activations stay bounded."""
        sizes = [self.objective.tokens([ex]) for ex in examples]
        return [examples[g.start:g.stop] for g in groups_of(sizes, self.config.micro_tokens)]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, batch: list[Any]) -> dict[str, float]:
        """Forward and backward over this process's share of `batch` in grad_accum micro-steps,
        then one optimizer step. Returns the step's metrics."""
        mine = split(batch, self.world.size)[self.world.rank]
        micro = [piece for part in split(mine, self.config.grad_accum)
                 for piece in self.by_tokens(part)]
        total = all_sum(self.objective.count(mine), self.world)
        scale = self.world.size / max(total, 1.0)  # gradients are averaged over processes
        self.model.train()
        loss_sum = 0.0
        for m in micro:
            with self.autocast():
                loss = self.objective.loss(self.model, m)
            (loss * scale).backward()
            loss_sum += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # type: ignore[union-attr]

        return {"loss": all_sum(loss_sum, self.world) / max(total, 1.0), "lr": lr,
                "grad_norm": float(norm), "trained_tokens": total,
                "tokens": all_sum(self.objective.tokens(mine), self.world)}

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        """The objective's validation metrics over `examples` (its loss, and whatever else it
        measures), each averaged over the objective's count."""
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0.0
        size = self.config.batch_size
        for i in range(0, len(examples), size):
            mine = split(examples[i:i + size], self.world.size)[self.world.rank]
            if len(mine):
                with self.autocast():
                    for key, value in measure(self.objective, self.model, mine).items():
                        sums[key] = sums.get(key, 0.0) + value
                count += self.objective.count(mine)
        total = max(all_sum(count, self.world), 1.0)
        keys = all_union(set(sums) | {"loss"}, self.world)
        return {key: all_sum(sums.get(key, 0.0), self.world) / total for key in keys}

    # ---- the run ---------------------------------------------------------------------------------
    def fit(self, train: Sequence[Any], validation: Sequence[Any] = (), *,
            draw: Callable[[list[Any]], tuple[list[Any], dict[str, float]]] | None = None,
            evaluate: Callable[[Sequence[Any]], dict[str, float]] | None = None,
            after_step: Callable[[], dict[str, float]] | None = None) -> list[dict[str, Any]]:
        """Train to the configured number of steps (resuming from the newest checkpoint when
        config.resume); returns the logged metrics of this call.

        Online methods pass `draw`, which turns each batch of `train` items (prompts) into the
        examples of the step (rollouts) and metrics to log, `evaluate` for their validation, and
        `after_step` (e.g. refreshing the engine from the updated weights)."""
        c = self.config
        total = self.total_steps(len(train))
        warmup = c.warmup_steps if c.warmup_steps is not None else math.ceil(0.03 * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, warmup, c.min_lr_ratio))
        if c.resume:
            self.resume()
        eval_every = c.eval_every or c.save_every or max(1, total // 10)
        logged: list[dict[str, Any]] = []
        batches = self.batches(train)
        bar = tqdm(total=total, initial=self.step, disable=not self.world.main, unit="step",
                   dynamic_ncols=True)
        started, tokens_done = time.perf_counter(), 0.0
        with bar:
            while self.step < total:
                batch, drawn = next(batches), {}
                if draw is not None:
                    batch, drawn = draw(batch)
                row = self.train_step(batch)
                if after_step is not None:
                    drawn.update(after_step())
                self.step += 1
                tokens_done += row["tokens"]
                elapsed = time.perf_counter() - started
                row = {"step": self.step, "epoch": self._epoch(len(train)), **row, **drawn,
                       "tokens_per_s": tokens_done / elapsed,
                       "elapsed_s": elapsed}
                if validation and (self.step % eval_every == 0 or self.step == total):
                    measured = (evaluate or self.evaluate)(validation)
                    row.update({f"eval_{k}": v for k, v in measured.items()})
                if self.step % c.log_every == 0 or self.step == total or any(
                        k.startswith("eval_") for k in row):
                    self._log(row)
                    logged.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if c.save_every and self.step % c.save_every == 0 and self.step < total:
                    self.save()
        self.save()
        return logged

    def _epoch(self, n: int) -> float:
        per_epoch = math.ceil(n / self.config.batch_size)
        return round(self.position.epoch + self.position.batch / per_epoch, 4)

    def _log(self, row: dict[str, Any]) -> None:
        if self.world.main:
            with open(self.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def save(self) -> Path:
        state = {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None}
        path = checkpoints.save(checkpoints.checkpoint_dir(self.out, self.step), self.model,
                                self.optimizer, state, self.world, frozen=self.trains_all)
        checkpoints.prune(self.out, self.config.keep_checkpoints, self.world)
        return path

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in the output directory, if any; the
        metrics logged after it by the interrupted run are dropped."""
        path = checkpoints.latest(self.out)
        if path is None:
            if self.world.main:
                tqdm.write(f"no checkpoint in {self.out / 'checkpoints'}: starting afresh")
            return
        state = checkpoints.load(path, self.model, self.optimizer, self.world,
                                 frozen=self.trains_all)
        self.step = state["step"]
        self.position = Position(state["epoch"], state["batch"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[union-attr]
        if self.world.main:
            metrics = self.out / METRICS
            if metrics.exists():
                rows = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line)["step"] <= self.step]
                metrics.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
            tqdm.write(f"resumed from {path} (step {self.step})")
