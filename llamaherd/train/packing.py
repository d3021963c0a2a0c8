"""Packing examples into rows: no padding between them, and nothing shared across them, except
on request the prefix they start with.

Each example keeps its own positions (restarting at 0) and its own document id, and the model's
attention never crosses documents (Transformer.forward's `documents`), so a packed row computes
what each example computes alone. Rows are padded at the end only, to the longest row of a batch.

With `share_prefix`, examples that start alike (the same long system prompt, a classifier's
instructions) are packed together and the untrained tokens they have in common computed once per
row: each row begins with them as document SHARED, which every example's tokens may attend to,
and each example continues at the positions after them. The losses are those of packing each
example whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

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


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def shareable(e: Example) -> int:
    """The most leading tokens of an example that a shared prefix may hold: none whose next
    token is trained, and at least one token left to the example."""
    trained = next((t for t, on in enumerate(e.labels[1:], 1) if on), len(e))
    return min(len(e) - 1, trained - 1)


def shared_prefix(examples: Sequence[Example]) -> int:
    """How many leading tokens every example has in common and can share."""
    return max(0, min(min(shareable(e), common_length(e.tokens, examples[0].tokens))
                      for e in examples))


def prefix_groups(examples: Sequence[Example]) -> list[list[int]]:
    """The examples' indices in groups that share a prefix, chosen to compute the fewest tokens:
    sorted by their tokens, the sorted list cut into runs so that the tokens of the runs' examples
    less their prefixes shared once a run is smallest (instructions that differ in one word near
    the start make two groups, each sharing a long prefix of its own)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].tokens)
    ex = [examples[i] for i in order]
    n = len(ex)
    caps = [shareable(e) for e in ex]
    # in sorted order, what a run shares with its first example is the least of its neighbours'
    adjacent = [common_length(a.tokens, b.tokens) for a, b in pairwise(ex)]
    best = [0] + [-1] * n  # best[j]: the fewest tokens computed for the first j examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        tokens, shared = 0, caps[j - 1]
        for i in range(j - 1, -1, -1):  # the last run is ex[i:j]
            tokens += len(ex[i])
            shared = min(shared, caps[i], adjacent[i] if i < j - 1 else shared)
            cost = best[i] + tokens - (j - i - 1) * max(shared, 0)
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


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
    examples that start alike packed together, their common untrained prefix once a row."""
    groups = prefix_groups(examples) if share_prefix else [list(range(len(examples)))]
    rows: list[tuple[int, list[int]]] = []  # (shared prefix length, example indices)
    for group in groups:
        p = shared_prefix([examples[i] for i in group]) if len(group) > 1 and share_prefix else 0
        for row in rows_of([len(examples[i]) - p for i in group], max_len - p,
                           [examples[i].where for i in group]):
            rows.append((p, [group[j] for j in row]))
    width = max(p + sum(len(examples[i]) - p for i in row) for p, row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    sequences = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (p, row) in enumerate(rows):
        tokens[r, :p] = torch.tensor(examples[row[0]].tokens[:p], dtype=torch.long)
        positions[r, :p] = torch.arange(p)
        documents[r, :p] = SHARED
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
