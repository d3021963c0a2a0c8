"""TrainConfig: every setting of a training run, from defaults, a config file and the command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaherd.train.lora import ALL_LINEAR, LoRAConfig

try:
    import tomllib
except ImportError:  # Python 3.10: config files in JSON only
    tomllib = None  # type: ignore[assignment]

PRECISIONS = ("auto", "float32", "bf16")
MARGIN_SCALES = ("large", "small", "none")


@dataclass
class TrainConfig:
    """A run's settings. `batch_size` is the global batch of one optimizer step (examples, split
    across processes and `grad_accum` micro-steps), so the same command under torchrun trains the
    same model."""

    model: str = "smollm2-135m-instruct"
    data: str = ""
    out: str = ""
    val_data: str | None = None  # a JSONL file held out; else val_fraction of `data`
    val_fraction: float = 0.05
    steps: int | None = None  # optimizer steps; default: `epochs` over the data
    epochs: float | None = None  # default 1 when steps is not given either
    batch_size: int = 8
    grad_accum: int = 1
    micro_tokens: int = 512  # at most this many tokens a forward/backward (activation memory)
    max_len: int = 512
    share_prefix: bool = False  # compute the examples' common untrained prefix once a packed row
    overlong: str = "truncate"  # or "drop"
    lr: float | None = None  # default 2e-5, or 2e-4 with LoRA
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int | None = None  # default 3% of the steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    precision: str = "auto"  # float32, bf16 (autocast), or auto: bf16 where the CPU has it
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_LINEAR
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between validation losses (0: at checkpoints and the end)
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    threads: int | None = None  # torch threads per process (default: torch's choice)
    beta: float = 0.1  # DPO: the strength of the pull toward the reference model
    nll: float = 0.2  # DPO: the weight of the chosen answer's NLL term (Llama 3)
    margin_scale: str = "large"  # reward model: Llama 2's margins by strength, "small" or "none"
    teacher: str | None = None  # distillation: the teacher model (default: `model` itself)
    kd_ratio: float = 0.5  # distillation: the KD term's weight; the NLL term's is 1 - kd_ratio
    kd_temperature: float = 1.0  # distillation: the softmax temperature of teacher and student
    kd_top_k: int = 32  # distillation: the teacher's logits kept (cached) at each position
    prune_keep: int | None = None  # distillation: layers the student keeps (default: all)
    verifier: str | None = None  # online (grpo, ppo): rewards from f(row, reply), by name or path
    reward_model: str | None = None  # online: ... or from this reward model
    group_size: int = 8  # online: answers sampled a prompt (GRPO's group)
    max_new_tokens: int = 256  # online: the longest sampled answer
    temperature: float = 1.0  # online: sampling temperature of the rollouts
    clip_epsilon: float = 0.2  # online: PPO's ratio (and value) clipping
    kl_coef: float = 0.01  # online: KL(policy || reference) weight (Llama 2: 0.01 at 7B/13B)
    value_coef: float = 0.1  # PPO: the value loss's weight
    gae_lambda: float = 0.95  # PPO: GAE's lambda (gamma is 1)
    labels: tuple[str, ...] = ("benign", "injection", "jailbreak")  # classify: the class names

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "micro_tokens", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.margin_scale not in MARGIN_SCALES:
            raise ValueError(f"margin_scale must be one of {', '.join(MARGIN_SCALES)}, got "
                             f"{self.margin_scale!r}")
        if not 0 <= self.kd_ratio <= 1:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.kd_top_k < 1:
            raise ValueError(f"kd_top_k must be >= 1, got {self.kd_top_k}")
        if self.prune_keep is not None and self.prune_keep < 1:
            raise ValueError(f"prune_keep must be >= 1, got {self.prune_keep}")
        for name in ("group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.verifier is not None and self.reward_model is not None:
            raise ValueError("give a verifier or a reward model, not both")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must name two or more distinct classes, got "
                             f"{list(self.labels)}")
        if self.lora:
            self.lora_config()  # checks rank, dropout, targets

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout,
                          tuple(self.lora_targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Settings from a TOML or JSON file, then `overrides` (those that are not None)."""
        path = Path(path)
        toml = path.suffix == ".toml"
        if toml and tomllib is None:
            raise ValueError(f"{path}: TOML config files need Python 3.11; use JSON")
        try:
            text = path.read_text(encoding="utf-8")
            values = tomllib.loads(text) if toml else json.loads(text)
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
            raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") \
                from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a table of settings")
        return cls.make(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def make(cls, **values: Any) -> TrainConfig:
        """A config from keyword values, naming any unknown setting."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        for name in ("lora_targets", "labels"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
