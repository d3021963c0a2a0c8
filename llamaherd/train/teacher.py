"""A teacher's top-k logits at every trained position, computed once and cached on disk.

Distillation needs the teacher's distribution at each position the student is trained on, every
epoch. Running the teacher once, in float32 without gradients, and keeping its k largest logits
(k = 32 by default) costs about 8 k bytes a position and frees the teacher's memory for training.

The cache lies in the output directory:
- `teacher-topk.safetensors`: `ids` (N, k) int32 and `logits` (N, k) float32, the raw logits
  (no temperature: distillation may use any temperature with the same cache) at the N trained
  positions of every distinct example, example after example, each example's positions in
  order; `digests` (E,) int64, a hash of each example's tokens and loss mask, and `offsets`
  (E + 1,) int64, where each example's rows start.
- `teacher-topk.json`: the format version, the teacher's name as given, k, the counts, and the
  fingerprint of the data (a hash of the sorted digests). A cache whose teacher, k or data
  differ is computed again; a changed split of the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llamaherd.model import Transformer
from llamaherd.train.data import Example
from llamaherd.train.losses import cross_entropy
from llamaherd.train.packing import IGNORE, Batch, pack

CACHE = "teacher-topk.safetensors"
CACHE_INFO = "teacher-topk.json"
VERSION = 1


@dataclass
class TaughtExample(Example):
    """An example and its teacher's top-k at each trained position (position t predicts token
    t + 1; rows in the order of the positions), once attached."""

    top_ids: torch.Tensor | None = None  # (trained, k) int32
    top_logits: torch.Tensor | None = None  # (trained, k) float32, raw logits


def digest(example: Example) -> int:
    """A 64-bit hash of an example's tokens and loss mask (what the teacher's outputs depend
    on), as a signed integer."""
    h = hashlib.blake2b(array("q", example.tokens).tobytes(), digest_size=8)
    h.update(bytes(example.labels))
    return int.from_bytes(h.digest(), "little", signed=True)


def fingerprint(examples: Sequence[Example]) -> str:
    """The data's fingerprint: the same for the same examples in any order."""
    digests = sorted({digest(e) for e in examples})
    return hashlib.sha256(array("q", digests).tobytes()).hexdigest()


def cache_info(folder: Path) -> dict | None:
    """The cache's description, or None where there is no complete cache."""
    if not (folder / CACHE).is_file() or not (folder / CACHE_INFO).is_file():
        return None
    try:
        return json.loads((folder / CACHE_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cache_matches(folder: Path, teacher: str, k: int, examples: Sequence[Example]) -> bool:
    """Whether `folder` holds the top-k of `teacher` for exactly these examples."""
    info = cache_info(folder)
    return info is not None and info.get("version") == VERSION and \
        info.get("teacher") == teacher and info.get("k") == k and \
        info.get("fingerprint") == fingerprint(examples)


def _groups(examples: Sequence[Example], tokens: int) -> list[Sequence[Example]]:
    """Consecutive groups of at most `tokens` tokens (a longer example alone)."""
    groups, start, size = [], 0, 0
    for i, ex in enumerate(examples):
        if i > start and size + len(ex) > tokens:
            groups.append(examples[start:i])
            start, size = i, 0
        size += len(ex)
    if start < len(examples):
        groups.append(examples[start:])
    return groups


def split_by_example(batch: Batch, values: torch.Tensor, n_examples: int
                     ) -> list[torch.Tensor]:
    """Rows (N, ...) over a packed batch's trained positions (row-major order) back to each
    packed example: n_examples tensors of (trained, ...)."""
    owner = batch.sequences[batch.targets != IGNORE]
    counts = torch.bincount(owner, minlength=n_examples)
    order = torch.unique_consecutive(owner).tolist()  # an example's positions are contiguous
    pieces = dict(zip(order, values.split([int(counts[i]) for i in order])))
    return [pieces.get(i, values[:0]) for i in range(n_examples)]


def top_k_of_batch(examples: Sequence[TaughtExample], batch: Batch
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (ids, logits), (N, k) each, at the N trained positions of `batch`, the
    packing of `examples`, in the order of `batch.targets != IGNORE`."""
    owner = batch.sequences[batch.targets != IGNORE]
    order = torch.unique_consecutive(owner).tolist()
    if any(examples[i].top_ids is None for i in order):
        raise RuntimeError("distillation examples need their teacher's top-k first")
    ids = torch.cat([examples[i].top_ids for i in order])  # type: ignore[misc]
    logits = torch.cat([examples[i].top_logits for i in order])  # type: ignore[misc]
    if ids.shape[0] != owner.shape[0]:
        raise RuntimeError(f"the teacher's top-k cover {ids.shape[0]} positions, the batch "
                           f"trains {owner.shape[0]}")
    return ids, logits


@torch.no_grad()
def teacher_top_k(model: Transformer, examples: Sequence[Example], k: int, max_len: int,
                  micro_tokens: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's k largest logits and their ids at each example's trained positions:
    one (ids int32, logits float32) pair of (trained, k) tensors an example, on the CPU. The
    examples are packed into forwards of about `micro_tokens` tokens, and the logits made a
    chunk of rows at a time."""
    model.eval()
    device = model.rope_freqs.device
    vocab = model.output.weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must be in 1..{vocab} (the vocabulary), got {k}")
    chunk = max(1, cross_entropy.CHUNK_FLOATS // vocab)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for group in _groups(examples, micro_tokens):
        batch = pack(group, max_len)
        h = model.hidden_states(batch.tokens.to(device), batch.positions.to(device),
                                documents=batch.documents.to(device))
        h = h[(batch.targets != IGNORE).to(device)]  # (N, dim)
        ids, logits = [], []
        for i in range(0, h.shape[0], chunk):
            top = model.output(h[i:i + chunk]).float().topk(k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu())
            logits.append(top.values.cpu())
        all_ids = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32)
        all_logits = torch.cat(logits) if logits else torch.zeros(0, k)
        out.extend(zip(split_by_example(batch, all_ids, len(group)),
                       split_by_example(batch, all_logits, len(group))))
    return out


def write_cache(folder: Path, teacher: str, k: int, examples: Sequence[Example],
                tops: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Write the top-k of `examples` (as teacher_top_k gives them) to the cache in `folder`,
    each distinct example once; the description last, so that a cache without one is never
    read."""
    seen: dict[int, int] = {}
    for i, ex in enumerate(examples):
        seen.setdefault(digest(ex), i)
    firsts = list(seen.values())
    counts = [tops[i][0].shape[0] for i in firsts]
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_INFO).unlink(missing_ok=True)
    save_file({"ids": torch.cat([tops[i][0] for i in firsts]).contiguous(),
               "logits": torch.cat([tops[i][1] for i in firsts]).contiguous(),
               "digests": torch.tensor(list(seen), dtype=torch.int64),
               "offsets": offsets}, folder / CACHE)
    (folder / CACHE_INFO).write_text(json.dumps(
        {"version": VERSION, "teacher": teacher, "k": k, "logits": "raw, before any temperature",
         "examples": len(firsts), "positions": int(offsets[-1]),
         "fingerprint": fingerprint(examples)}, indent=2) + "\n", encoding="utf-8")
    return folder / CACHE


def attach_top_k(examples: Sequence[TaughtExample], folder: Path) -> None:
    """Give every example its rows of the cache in `folder`."""
    cache = load_file(folder / CACHE)
    offsets = cache["offsets"].tolist()
    where = {d: i for i, d in enumerate(cache["digests"].tolist())}
    for ex in examples:
        i = where.get(digest(ex))
        if i is None:
            raise RuntimeError(f"{ex.where}: not in the teacher cache {folder / CACHE}")
        ex.top_ids = cache["ids"][offsets[i]:offsets[i + 1]]
        ex.top_logits = cache["logits"][offsets[i]:offsets[i + 1]]
        if ex.top_ids.shape[0] != ex.trained:
            raise RuntimeError(f"{ex.where}: the teacher cache has {ex.top_ids.shape[0]} "
                               f"positions for {ex.trained} trained tokens")


def cache_teacher(teacher: str, examples: Sequence[Example], folder: Path, k: int = 32,
                  max_len: int = 512, micro_tokens: int = 512,
                  device: torch.device | str = "cpu", vocab_size: int | None = None) -> bool:
    """Make sure `folder` caches the top-k of `teacher` (any checkpoint llamaherd reads, run in
    float32) for `examples`: reused where it matches, else computed and written. Returns
    whether it was computed. `vocab_size`: the student's, which the teacher's must equal."""
    if cache_matches(folder, teacher, k, examples):
        return False
    from llamaherd.api import open_checkpoint

    ckpt, _ = open_checkpoint(teacher, dtype="float32")
    if vocab_size is not None and ckpt.args.vocab_size != vocab_size:
        raise ValueError(f"the teacher {teacher} has a vocabulary of {ckpt.args.vocab_size} "
                         f"tokens, the student {vocab_size}: they must share one")
    model = ckpt.model.to(device)
    tops = teacher_top_k(model, examples, k, max_len, micro_tokens)
    del ckpt, model
    write_cache(folder, teacher, k, examples, tops)
    return True
