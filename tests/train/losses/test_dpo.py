"""DPO's loss against values worked out by hand, and its sequence log-probabilities (with the
formatting tokens left out) against the full logits of a tiny model, gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from llamaherd.train.data import Example
from llamaherd.train.losses import dpo_loss, sequence_log_probs
from llamaherd.train.preference import Pair
from llamaherd.train.recipes.dpo import DPOObjective
from tests.support.models import make_tiny_model

EOT = 7  # plays the end-of-turn token


def test_dpo_loss_hand_computed() -> None:
    # beta * ((-1 - -2) - (-3 - -2)) = 0.1 * 2 = 0.2; -log sigmoid(0.2) = log(1 + e^-0.2)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                    torch.tensor([-2.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    # the policy equal to the reference: log 2 whatever beta
    same = dpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-5.0]),
                    torch.tensor([-9.0]), beta=0.5)
    assert same.item() == pytest.approx(math.log(2), rel=1e-6)


def side(prompt: list[int], answer: list[int]) -> Example:
    tokens = prompt + answer
    return Example(tokens, [False] * len(prompt) + [True] * len(answer), "test")


def pairs() -> list[Pair]:
    return [Pair(side([1, 5, 9], [20, 21, 22, EOT]), side([1, 5, 9], [30, 31, EOT]), 0.0, "a"),
            Pair(side([1, 4], [40, EOT]), side([1, 4], [50, 51, 52, 53, EOT]), 0.0, "b")]


def plain_log_probs(model, ex: Example, skip: set[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                  int]:
    """(sum over non-formatting trained tokens, sum over all trained tokens, count), from the
    full logits of the example alone."""
    logits = model(torch.tensor([ex.tokens]))[0].float()
    logp = torch.log_softmax(logits, -1)
    scored = trained = torch.zeros(())
    n = 0
    for t in range(1, len(ex)):
        if ex.labels[t]:
            lp = logp[t - 1, ex.tokens[t]]
            trained = trained + lp
            n += 1
            if ex.tokens[t] not in skip:
                scored = scored + lp
    return scored, trained, n


def test_sequence_log_probs_leave_out_formatting_tokens() -> None:
    model = make_tiny_model()
    from llamaherd.train.packing import pack

    examples = [ex for p in pairs() for ex in (p.chosen, p.rejected)]
    lp = sequence_log_probs(model, pack(examples, max_len=10), len(examples), {EOT})
    for i, ex in enumerate(examples):
        scored, trained, n = plain_log_probs(model, ex, {EOT})
        assert lp.scored[i].item() == pytest.approx(scored.item(), abs=1e-5)
        assert lp.trained[i].item() == pytest.approx(trained.item(), abs=1e-5)
        assert lp.count[i].item() == n
        assert lp.scored[i].item() != pytest.approx(lp.trained[i].item())  # EOT did count


@pytest.mark.parametrize("nll", [0.0, 0.2])
def test_objective_equals_the_formula_on_full_logits_with_gradients(nll: float) -> None:
    torch.manual_seed(0)
    model = make_tiny_model()
    objective = DPOObjective(max_len=16, formatting=frozenset({EOT}), beta=0.1, nll=nll)
    ps = pairs()
    refs = [(-20.0, -18.5), (-9.0, -30.0)]
    for p, ref in zip(ps, refs, strict=True):
        p.reference = ref
    ours = objective.loss(model, ps)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    expected = torch.zeros(())
    for p, (ref_c, ref_r) in zip(ps, refs, strict=True):
        c, c_all, n_c = plain_log_probs(model, p.chosen, {EOT})
        r, _, _ = plain_log_probs(model, p.rejected, {EOT})
        x = 0.1 * ((c - ref_c) - (r - ref_r))
        expected = expected - torch.log(torch.sigmoid(x)) + nll * (-c_all / n_c)
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pairs_without_reference_are_refused() -> None:
    objective = DPOObjective(max_len=16, formatting=frozenset({EOT}))
    with pytest.raises(RuntimeError, match="reference"):
        objective.loss(make_tiny_model(), pairs())
