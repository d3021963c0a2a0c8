"""The Transformer: trainable by plain autograd, and its cache paths (consecutive cache rows as
views, arbitrary rows as gathers)."""

from __future__ import annotations

import pytest
import torch

from tests.support.models import TINY, make_tiny_model


@torch.inference_mode()
def test_cache_rows_consecutive_or_not_give_the_same_logits() -> None:
    model = make_tiny_model(TINY)
    a, b = torch.tensor([[5, 9, 11, 3]]), torch.tensor([[7, 2, 8, 30]])
    ref = [model(x)[0, -1] for x in (a, b)]  # no cache

    def run(rows: list[int]) -> list[torch.Tensor]:
        model.setup_cache(4, 16)
        both = torch.cat([a, b])
        pos = torch.arange(3).expand(2, 3)
        model(both[:, :3], pos, cache_rows=torch.tensor(rows))
        out = model(both[:, 3:], torch.full((2, 1), 3), cache_rows=torch.tensor(rows))
        return [out[0, -1], out[1, -1]]

    for rows in ([2, 3], [3, 1], [0, 1]):  # consecutive (a slice), reversed gap, the first rows
        got = run(rows)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    model.drop_cache()


@torch.inference_mode()
def test_batched_decode_at_different_positions_matches_single_runs() -> None:
    model = make_tiny_model(TINY)
    prompts = [torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[9, 8]])]
    ref = [model(p)[0, -1] for p in prompts]
    model.setup_cache(2, 16)
    # right-padded prefill: row 1's padding lands at positions its later tokens overwrite
    padded = torch.tensor([[1, 2, 3, 4], [9, 0, 0, 0]])
    model(padded, torch.arange(4).expand(2, 4))
    out = model(torch.tensor([[5], [8]]), torch.tensor([[4], [1]]))
    for i in range(2):
        torch.testing.assert_close(out[i, -1], ref[i], atol=1e-5, rtol=1e-5)
    model.drop_cache()


def test_gradients_through_the_model_equal_finite_differences() -> None:
    """loss.backward() through model.py gives, for weights of every kind (embedding, attention
    projections, feed-forward, norms, output), the central finite difference of the loss."""
    args = TINY.replace(vocab_size=64)
    model = make_tiny_model(args, seed=3).double().train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, args.vocab_size, (2, 9), generator=g)

    def loss() -> torch.Tensor:
        logits = model(tokens)
        assert logits.dtype == torch.float64
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    loss().backward()
    params = dict(model.named_parameters())
    picks = [("tok_embeddings.weight", (int(tokens[0, 3]), 5)),
             ("layers.0.attention.wq.weight", (7, 11)), ("layers.1.attention.wk.weight", (3, 40)),
             ("layers.0.attention.wv.weight", (20, 2)), ("layers.1.attention.wo.weight", (9, 9)),
             ("layers.0.feed_forward.w1.weight", (100, 30)),
             ("layers.1.feed_forward.w2.weight", (50, 150)),
             ("layers.1.feed_forward.w3.weight", (0, 63)), ("layers.0.attention_norm.weight", (4,)),
             ("layers.1.ffn_norm.weight", (60,)), ("norm.weight", (17,)),
             ("output.weight", (int(targets[1, 4]), 8))]
    eps = 1e-6
    for name, index in picks:
        p = params[name]
        with torch.no_grad():
            saved = p[index].item()
            p[index] = saved + eps
            up = loss().item()
            p[index] = saved - eps
            down = loss().item()
            p[index] = saved
        numeric = (up - down) / (2 * eps)
        assert p.grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_hidden_states_are_what_the_output_projection_reads() -> None:
    model = make_tiny_model(TINY)
    tokens = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        h = model.hidden_states(tokens)
        assert h.shape == (1, 5, TINY.dim)
        torch.testing.assert_close(model.output(h), model(tokens))
