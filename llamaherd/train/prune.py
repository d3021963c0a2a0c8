"""Layer pruning: a smaller student made of some of a model's blocks, before distillation.

Llama 3.2 1B and 3B began as pruned Llama 3.1 8B models, their lost quality won back by
distilling from the larger models' logits. Here pruning removes whole blocks (depth): every
kept block is copied unchanged, with the embeddings, the final norm and the output projection,
and ModelArgs.n_layers becomes the number kept.

Which blocks: a list of indices, every n-th block dropped, or a count kept. A count keeps the
first and the last block and spreads the rest evenly between them (the first block reads the
embeddings and the last writes what the output projection reads, the two a model can least
do without).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from llamaherd.config import ModelArgs
from llamaherd.model import Transformer


def layers_to_keep(n_layers: int, keep: Sequence[int] | None = None,
                   drop_every: int | None = None, n_keep: int | None = None) -> list[int]:
    """The indices of the blocks to keep, in order, from exactly one of: `keep` (the indices),
    `drop_every` (drop blocks n-1, 2n-1, ...: every n-th), `n_keep` (that many: the first, the
    last and the rest evenly spaced, i * (n_layers - 1) / (n_keep - 1) rounded)."""
    given = [name for name, value in (("keep", keep), ("drop_every", drop_every),
                                      ("n_keep", n_keep)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of keep, drop_every and n_keep, got "
                         f"{', '.join(given) or 'none'}")
    if keep is not None:
        chosen = sorted(set(keep))
        if not chosen or chosen[0] < 0 or chosen[-1] >= n_layers:
            raise ValueError(f"layers to keep must be among 0..{n_layers - 1}, got {list(keep)}")
        return chosen
    if drop_every is not None:
        if drop_every < 2:
            raise ValueError(f"drop_every must be >= 2 (1 would drop every layer), "
                             f"got {drop_every}")
        return [i for i in range(n_layers) if (i + 1) % drop_every]
    assert n_keep is not None
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"n_keep must be in 1..{n_layers}, got {n_keep}")
    if n_keep == 1:
        return [0]
    # consecutive targets are >= 1 apart, so their roundings are distinct
    return [int(i * (n_layers - 1) / (n_keep - 1) + 0.5) for i in range(n_keep)]


def prune_layers(model: Transformer, keep: Sequence[int] | None = None,
                 drop_every: int | None = None, n_keep: int | None = None) -> Transformer:
    """A new Transformer made of copies of the chosen blocks of `model` (see layers_to_keep),
    with its embeddings, final norm and output projection (tied if they were); `model` is left
    as it was. Only the kept weights are copied."""
    chosen = layers_to_keep(model.args.n_layers, keep, drop_every, n_keep)
    with torch.device("meta"):  # nothing allocated: every module is replaced below
        pruned = Transformer(model.args.replace(n_layers=len(chosen)))
    memo: dict[int, object] = {}  # one memo: a tied output weight stays tied in the copy
    pruned.tok_embeddings = copy.deepcopy(model.tok_embeddings, memo)
    pruned.layers = nn.ModuleList(copy.deepcopy(model.layers[i], memo) for i in chosen)
    pruned.norm = copy.deepcopy(model.norm, memo)
    pruned.output = copy.deepcopy(model.output, memo)
    pruned.register_buffer("rope_freqs", model.rope_freqs.clone(), persistent=False)
    return pruned.train(model.training)


def keep_layers(model: Transformer, keep: Sequence[int]) -> ModelArgs:
    """Prune `model` in place to the blocks `keep` (indices as layers_to_keep returns them): the
    others are released, model.args updated. Returns the new args, for whatever else holds them
    (a checkpoint that is exported with its args)."""
    chosen = layers_to_keep(model.args.n_layers, keep=keep)
    model.layers = nn.ModuleList(model.layers[i] for i in chosen)
    model.args = model.args.replace(n_layers=len(chosen))
    return model.args
