"""Packing examples into rows: no padding between them, and nothing shared across them.

Each example keeps its own positions (restarting at 0) and its own document id, and the model's
attention never crosses documents (Transformer.forward's `documents`), so a packed row computes
what each example computes alone. Rows are padded at the end only, to the longest row of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamaherd.train.data import Example

IGNORE = -100  # a target that carries no loss


@dataclass
class Batch:
    """Packed rows (R, L): `targets[r, t]` is the token that position t predicts (the next token
    of its example) where that token is trained, else IGNORE."""

    tokens: torch.Tensor  # (R, L) int64
    positions: torch.Tensor  # (R, L) int64, restarting at 0 for every example
    documents: torch.Tensor  # (R, L) int64: the example's index in the row, -1 for padding
    targets: torch.Tensor  # (R, L) int64
    sequences: torch.Tensor  # (R, L) int64: the example's index in the list packed, -1 for padding

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int((self.documents >= 0).sum())


def groups_of(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive groups of items (their indices) whose sizes add up to at most `limit`, an item
    larger than that alone: micro-batches that bound one forward's memory."""
    groups: list[range] = []
    start = total = 0
    for i, n in enumerate(sizes):
        if i > start and total + n > limit:
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


def rows_of(examples: Sequence[Example], max_len: int) -> list[list[int]]:
    """The indices of the examples in rows of at most max_len tokens, first fit, in order."""
    rows: list[list[int]] = []
    sizes: list[int] = []
    for i, ex in enumerate(examples):
        if len(ex) > max_len:
            raise ValueError(f"{ex.where}: {len(ex)} tokens do not fit a row of {max_len}")
        for r, size in enumerate(sizes):
            if size + len(ex) <= max_len:
                rows[r].append(i)
                sizes[r] += len(ex)
                break
        else:
            rows.append([i])
            sizes.append(len(ex))
    return rows


def pack(examples: Sequence[Example], max_len: int) -> Batch:
    """One batch of the examples packed into rows of at most max_len tokens."""
    rows = rows_of(examples, max_len)
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    sequences = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            ids = torch.tensor(ex.tokens)
            tokens[r, at:at + n] = ids
            positions[r, at:at + n] = torch.arange(n)
            documents[r, at:at + n] = d
            sequences[r, at:at + n] = i
            trained = torch.tensor(ex.labels[1:], dtype=torch.bool)
            targets[r, at:at + n - 1] = torch.where(trained, ids[1:], IGNORE)
            at += n
    return Batch(tokens, positions, documents, targets, sequences)
