"""Reward models: a Llama backbone with a scalar head on the final hidden state of a
conversation's last token, and the scores it gives.

The head is a `score` linear layer (dim -> 1) added to a Transformer by `add_score_head`, so the
model trains, shards and checkpoints as any other; exported, it is a Hugging Face
LlamaForSequenceClassification directory, which `RewardModel.load` reads back.

    rm = RewardModel.load("rm-dir")
    rm.score([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])

Llama 2 trained two reward models, helpfulness and safety, and used the safety score where a
prompt is safety-related or the safety score is below 0.15, else the helpfulness score
(`combine_rewards`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaherd.chat import ChatFormat, chat_format
from llamaherd.chat.messages import as_messages, as_tools
from llamaherd.model import Transformer
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.data import DataError, Example, encode_row
from llamaherd.train.losses.reward import last_token_scores
from llamaherd.train.packing import groups_of, pack

SCORE = "score"  # the head's module name (and, with ".weight", its tensor's)


def add_score_head(model: nn.Module, weight: torch.Tensor | None = None,
                   seed: int = 0, name: str = SCORE, outputs: int = 1) -> nn.Linear:
    """Give `model` a head `name` (dim -> outputs, no bias; a scalar `score` for rewards or
    `value` for PPO's values, one logit per class for a classifier): `weight` if given (its rows
    set the outputs), else drawn with `seed` as nn.Linear draws its weights."""
    dim = model.tok_embeddings.weight.shape[1]
    if weight is not None:
        outputs = weight.shape[0]
    head = nn.Linear(dim, outputs, bias=False, dtype=model.tok_embeddings.weight.dtype,
                     device=model.tok_embeddings.weight.device)
    with torch.no_grad():
        if weight is not None:
            if weight.dim() != 2 or weight.shape[1] != dim:
                raise ValueError(f"a score head of shape {tuple(weight.shape)} does not fit a "
                                 f"model of dim {dim}")
            head.weight.copy_(weight)
        else:
            bound = 1 / math.sqrt(dim)
            g = torch.Generator().manual_seed(seed)
            head.weight.copy_(torch.rand(outputs, dim, generator=g) * 2 * bound - bound)
    model.add_module(name, head)
    return head


def as_row(item: Any) -> dict[str, Any]:
    """A conversation (a message list), a prompt/completion dict or a messages row, as a row
    encode_row reads."""
    if isinstance(item, list):
        return {"messages": item}
    if isinstance(item, dict):
        return item
    raise DataError("a conversation to score is a list of messages or a JSON object")


class RewardModel:
    """A reward model ready to score conversations (float32, no gradients)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, fmt: ChatFormat | None = None,
                 batch_tokens: int = 2048) -> None:
        if not hasattr(model, SCORE):
            raise ValueError("the model has no score head")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.fmt = fmt or chat_format(tokenizer)
        self.batch_tokens = batch_tokens

    @classmethod
    def load(cls, name_or_path: str | Path) -> RewardModel:
        """A reward model directory written by `llamaherd train reward`."""
        from llamaherd.api import open_checkpoint

        ckpt, tokenizer = open_checkpoint(name_or_path, dtype="float32")
        weight = ckpt.heads.get(f"{SCORE}.weight")
        if weight is None:
            raise ValueError(f"{ckpt.path} has no score head: not a reward model (train one "
                             f"with `llamaherd train reward`)")
        add_score_head(ckpt.model, weight)
        return cls(ckpt.model, tokenizer)

    def encode(self, item: Any) -> Example:
        row = as_row(item)
        if "messages" in row:  # score the whole conversation, whoever spoke last
            ids = self.fmt.encode_dialog(as_messages(row["messages"]), as_tools(row.get("tools")),
                                         add_generation_prompt=False)
            return Example(ids, [True] * len(ids), "")
        return encode_row(row, self.fmt, self.tokenizer)

    def score(self, items: Sequence[Any]) -> list[float]:
        """The reward of each conversation (messages) or prompt/completion row."""
        return self.score_examples([self.encode(item) for item in items])

    @torch.no_grad()
    def score_examples(self, examples: Sequence[Example]) -> list[float]:
        """The reward of each encoded example, in batches of about batch_tokens tokens."""
        out: list[float] = []
        for group in groups_of([len(e) for e in examples], self.batch_tokens):
            chunk = examples[group.start:group.stop]
            batch = pack(chunk, max(max(len(e) for e in chunk), self.batch_tokens))
            out += last_token_scores(self.model, getattr(self.model, SCORE), batch,
                                     len(chunk)).tolist()
        return out


def combine_rewards(helpful: float, safety: float, safety_prompt: bool = False,
                    threshold: float = 0.15) -> float:
    """Llama 2's combined reward from two reward models' raw scores: the safety score where the
    prompt is safety-related or sigmoid(safety) is below `threshold`, else the helpfulness score
    (both compared on the sigmoid scale, as the paper states the 0.15 threshold)."""
    p_safe = 1 / (1 + math.exp(-safety))
    return safety if safety_prompt or p_safe < threshold else helpful


def score_rows(models: Sequence[RewardModel], path: str | Path) -> list[dict[str, Any]]:
    """The rewards of every row of a JSONL file: {"reward": r} for a conversation or
    prompt/completion row, {"chosen": r, "rejected": r} for a preference row. With a second
    (safety) model each reward is Llama 2's combination (a row's "safety": true marks a
    safety-related prompt), and the two models' own scores follow it."""
    from llamaherd.train.data import read_rows

    encoded: list[list[Example]] = [[] for _ in models]  # each model encodes in its format
    shapes: list[tuple[str, ...]] = []
    safety_tags: list[bool] = []
    for where, row in read_rows(path):
        try:
            if {"prompt", "chosen", "rejected"} <= row.keys():
                items = [{"prompt": row["prompt"], "tools": row.get("tools"),
                          "completion": row[key] if not isinstance(row[key], dict)
                          else [row[key]]} for key in ("chosen", "rejected")]
                shapes.append(("chosen", "rejected"))
            else:
                items = [as_row(row)]
                shapes.append(("reward",))
            for model, into in zip(models, encoded, strict=True):
                into += [model.encode(item) for item in items]  # a bad row named before scoring
        except (DataError, ValueError) as e:
            raise DataError(f"{where}: {e}") from None
        safety_tags.append(bool(row.get("safety")))
    scores = [m.score_examples(e) for m, e in zip(models, encoded, strict=True)]
    out, at = [], 0
    for shape, tagged in zip(shapes, safety_tags, strict=True):
        line: dict[str, Any] = {}
        for key in shape:
            if len(models) == 1:
                line[key] = scores[0][at]
            else:
                helpful, safety = scores[0][at], scores[1][at]
                line[key] = combine_rewards(helpful, safety, tagged)
                line[f"{key}_helpfulness"], line[f"{key}_safety"] = helpful, safety
            at += 1
        out.append(line)
    return out
