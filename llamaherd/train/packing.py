"""Packing examples into rows: no padding between them, and nothing shared across them, except
on request a prefix they all start with.

Each example keeps its own positions (restarting at 0) and its own document id, and the model's
attention never crosses documents (Transformer.forward's `documents`), so a packed row computes
what each example computes alone. Rows are padded at the end only, to the longest row of a batch.

With `share_prefix`, the untrained tokens every example of the batch starts with (a long system
prompt, a classifier's instructions) are computed once per row: each row begins with them as
document SHARED, which every example's tokens may attend to, and each example continues at the
positions after them. The losses are those of packing each example whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamaherd.model import SHARED
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


def shared_prefix(examples: Sequence[Example]) -> int:
    """How many leading tokens every example has in common and can share: none of those tokens'
    next tokens is trained, and each example keeps at least one token of its own."""
    first = examples[0].tokens
    n = min(len(e) for e in examples) - 1
    for e in examples:
        trained = next((t for t, on in enumerate(e.labels[1:], 1) if on), len(e))
        same = next((i for i, (a, b) in enumerate(zip(e.tokens, first)) if a != b), n)
        n = min(n, trained - 1, same)
    return max(n, 0)


def rows_of(sizes: Sequence[int], max_len: int, where: Sequence[str]) -> list[list[int]]:
    """The indices of items of these sizes in rows of at most max_len tokens, first fit, in
    order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(sizes):
        if n > max_len:
            raise ValueError(f"{where[i]}: {n} tokens do not fit a row of {max_len}")
        for r, size in enumerate(room):
            if size + n <= max_len:
                rows[r].append(i)
                room[r] += n
                break
        else:
            rows.append([i])
            room.append(n)
    return rows


def pack(examples: Sequence[Example], max_len: int, share_prefix: bool = False) -> Batch:
    """One batch of the examples packed into rows of at most max_len tokens; with share_prefix,
    their common untrained prefix once at the start of each row."""
    p = shared_prefix(examples) if share_prefix and len(examples) > 1 else 0
    prefix = torch.tensor(examples[0].tokens[:p], dtype=torch.long)
    rows = rows_of([len(e) - p for e in examples], max_len - p, [e.where for e in examples])
    width = p + max(sum(len(examples[i]) - p for i in row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    sequences = torch.full((len(rows), width), -1, dtype=torch.long)
    tokens[:, :p] = prefix
    positions[:, :p] = torch.arange(p)
    documents[:, :p] = SHARED
    for r, row in enumerate(rows):
        at = p
        for d, i in enumerate(row):
            ex = examples[i]
            n = len(ex) - p
            ids = torch.tensor(ex.tokens[p:])
            tokens[r, at:at + n] = ids
            positions[r, at:at + n] = torch.arange(p, p + n)
            documents[r, at:at + n] = d
            sequences[r, at:at + n] = i
            trained = torch.tensor(ex.labels[p + 1:], dtype=torch.bool)
            targets[r, at:at + n - 1] = torch.where(trained, ids[1:], IGNORE)
            at += n
    return Batch(tokens, positions, documents, targets, sequences)
