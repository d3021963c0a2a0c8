"""Layer pruning: which blocks are kept, and a pruned model computes exactly what running only
those blocks of the original computes."""

from __future__ import annotations

import pytest
import torch

from llamaherd.model import StepContext, Transformer
from llamaherd.train.prune import keep_layers, layers_to_keep, prune_layers
from tests.support.models import TINY, make_tiny_model


def manual_forward(model: Transformer, tokens: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """Logits of `tokens` (1, T) through the embeddings, only `blocks`, the norm and the head."""
    T = tokens.shape[1]
    ctx = StepContext.make(torch.arange(T).expand(1, T), None, model.rope_freqs)
    h = model.tok_embeddings(tokens)
    for i in blocks:
        h = model.layers[i](h, ctx)
    return model.head(h)


def test_which_layers_are_kept() -> None:
    assert layers_to_keep(8, n_keep=4) == [0, 2, 5, 7]  # first, last, evenly between
    assert layers_to_keep(16, n_keep=8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert layers_to_keep(32, n_keep=16)[::15] == [0, 31] and len(set(layers_to_keep(
        32, n_keep=16))) == 16
    assert layers_to_keep(5, n_keep=5) == [0, 1, 2, 3, 4]
    assert layers_to_keep(5, n_keep=1) == [0]
    assert layers_to_keep(6, drop_every=2) == [0, 2, 4]
    assert layers_to_keep(6, drop_every=3) == [0, 1, 3, 4]
    assert layers_to_keep(6, keep=[4, 1, 1]) == [1, 4]
    for bad in ({}, {"keep": [0], "n_keep": 1}, {"keep": [6]}, {"keep": []},
                {"n_keep": 0}, {"n_keep": 7}, {"drop_every": 1}):
        with pytest.raises(ValueError):
            layers_to_keep(6, **bad)


@pytest.mark.parametrize("tied", [False, True])
def test_a_pruned_model_runs_only_the_kept_blocks(tied: bool) -> None:
    model = make_tiny_model(TINY.replace(n_layers=4, tie_embeddings=tied))
    tokens = torch.randint(0, TINY.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_layers(model, n_keep=2)
    assert pruned.args == model.args.replace(n_layers=2) and len(pruned.layers) == 2
    assert model.args.n_layers == 4 and len(model.layers) == 4  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), manual_forward(model, tokens, [0, 3]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(prune_layers(model, keep=[1, 2])(tokens),
                                   manual_forward(model, tokens, [1, 2]), rtol=0, atol=0)
    assert (pruned.output.weight is pruned.tok_embeddings.weight) == tied
    assert pruned.output.weight is not model.output.weight  # a copy, not a view of the original
    with torch.no_grad():
        pruned.layers[0].attention.wq.weight.add_(1.0)
        pruned.tok_embeddings.weight.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(pruned.state_dict()) == {k.replace("layers.3.", "layers.1.") for k in before
                                        if not k.startswith(("layers.1.", "layers.2."))}


def test_pruning_in_place_keeps_the_model_object_and_returns_the_new_args() -> None:
    model = make_tiny_model(TINY.replace(n_layers=3))
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = manual_forward(model, tokens, [0, 2])
    args = keep_layers(model, [0, 2])
    assert args.n_layers == 2 and model.args is args and len(model.layers) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
