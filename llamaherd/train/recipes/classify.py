"""The classifier recipe: labelled texts in, a Llama backbone with a class head out (the reward
model's architecture with one logit per class), as llamaherd's Prompt Guard classifier is built.

    llamaherd train classify --data texts.jsonl --out clf [--labels benign,injection,jailbreak]
        [--prune-keep 8]

Each row is {"text": ..., "label": a class name or index}. The text is encoded as the classifier
reads it at inference (tokenizer.encode_prompt: BOS first where the model uses one; the first
max_len tokens kept) and the head reads the final hidden state of its last token; the loss is
the cross-entropy of the head's logits. With prune_keep the backbone keeps that many of the
model's blocks (llamaherd.train.prune), for a smaller, faster classifier. Validation reports the
loss and the accuracy. The output directory is a LlamaForSequenceClassification with the class
names in config.json's id2label.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.chat import ChatFormat
from llamaherd.checkpoint import Checkpoint
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.config import TrainConfig
from llamaherd.train.data import DataError, DataStats, Example, read_rows
from llamaherd.train.losses.reward import last_token_outputs
from llamaherd.train.packing import pack
from llamaherd.train.prune import keep_layers, layers_to_keep
from llamaherd.train.recipes.common import Recipe, run_recipe
from llamaherd.train.reward_model import SCORE, add_score_head
from llamaherd.train.trainer import Objective


@dataclass
class LabelledText:
    tokens: list[int]
    label: int
    where: str

    def __len__(self) -> int:
        return len(self.tokens)


def load_labelled(path: str | Path, tokenizer: Tokenizer, labels: Sequence[str],
                  max_len: int) -> tuple[list[LabelledText], DataStats]:
    """The rows of a JSONL file of {"text", "label"} as token ids (cut to max_len) and class
    indices; a bad row is an error naming its line."""
    stats, items = DataStats(), []
    for where, row in read_rows(path):
        stats.rows += 1
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: a row needs a non-empty \"text\" string")
        if isinstance(label, str) and label in labels:
            label = labels.index(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(labels):
            raise DataError(f"{where}: \"label\" must be one of {', '.join(labels)} or its index "
                            f"0-{len(labels) - 1}, got {row.get('label')!r}")
        ids = tokenizer.encode_prompt(text)
        if len(ids) > max_len:
            ids = ids[:max_len]
            stats.truncated += 1
        stats.tokens += len(ids)
        items.append(LabelledText(ids, label, where))
    if not items:
        raise DataError(f"{path}: no text to train on")
    return items, stats


@dataclass
class ClassifyObjective:
    """Cross-entropy of the class head on each text's last token, summed over texts."""

    max_len: int

    def logits(self, model: nn.Module, items: Sequence[LabelledText]) -> torch.Tensor:
        examples = [Example(t.tokens, [False] * len(t), t.where) for t in items]
        return last_token_outputs(model, getattr(model, SCORE), pack(examples, self.max_len),
                                  len(items))

    def loss(self, model: nn.Module, items: Sequence[LabelledText]) -> torch.Tensor:
        target = torch.tensor([t.label for t in items])
        return F.cross_entropy(self.logits(model, items), target, reduction="sum")

    def measure(self, model: nn.Module, items: Sequence[LabelledText]) -> dict[str, float]:
        logits = self.logits(model, items)
        target = torch.tensor([t.label for t in items])
        return {"loss": float(F.cross_entropy(logits, target, reduction="sum")),
                "accuracy": float((logits.argmax(-1) == target).sum())}

    def count(self, items: Sequence[LabelledText]) -> int:
        return len(items)

    def tokens(self, items: Sequence[LabelledText]) -> int:
        return sum(len(t) for t in items)


class Classify(Recipe):
    name = "classify"

    def __init__(self) -> None:
        self.labels: tuple[str, ...] = ()
        self.kept: list[int] | None = None

    def load(self, path: str, fmt: ChatFormat, tokenizer: Tokenizer,
             config: TrainConfig) -> tuple[list[Any], DataStats]:
        self.labels = config.labels
        return load_labelled(path, tokenizer, config.labels, config.max_len)

    def objective(self, config: TrainConfig) -> Objective:
        return ClassifyObjective(config.max_len)

    def extend(self, model: nn.Module, ckpt: Checkpoint, config: TrainConfig) -> None:
        """Prune to prune_keep blocks (the checkpoint takes the new args, so the export writes
        them), then add the class head (or continue the checkpoint's)."""
        if config.prune_keep is not None and config.prune_keep != ckpt.args.n_layers:
            self.kept = layers_to_keep(ckpt.args.n_layers, n_keep=config.prune_keep)
            ckpt.args = keep_layers(model, self.kept)  # type: ignore[arg-type]
        weight = ckpt.heads.get(f"{SCORE}.weight")
        if weight is not None and weight.shape[0] != len(config.labels):
            weight = None  # a head for other classes: start a new one
        add_score_head(model, weight, seed=config.seed, outputs=len(config.labels))

    def unfreeze(self, model: nn.Module) -> None:
        getattr(model, SCORE).weight.requires_grad_(True)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": list(self.labels)}
        if self.kept is not None:
            out["kept_layers"] = self.kept
        return out


def name_labels(out: Path, labels: Sequence[str]) -> None:
    """Write the class names into the exported config.json (id2label, label2id), as Hugging
    Face sequence classifiers carry them."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    path.write_text(json.dumps(config, indent=2) + "\n")


def classify(config: TrainConfig) -> Path:
    """Train a text classifier as `config` says; returns the output directory."""
    out = run_recipe(Classify(), config)
    name_labels(out, config.labels)
    return out
