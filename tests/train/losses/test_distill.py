"""The chunked distillation loss against the same loss written out over the full logits, and
against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamaherd.train.data import Example
from llamaherd.train.losses import cross_entropy, sft_loss
from llamaherd.train.losses.distill import distill_loss, linear_distill
from llamaherd.train.packing import IGNORE, pack
from tests.support.models import TINY, make_tiny_model


def case(n: int = 29, d: int = 16, v: int = 203, k: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    teacher = 2 * torch.randn(n, v, generator=g)
    top_logits, top_ids = teacher.topk(k, dim=-1)
    return h, w, t, top_ids, top_logits


def full_logits_loss(h, w, t, top_ids, top_logits, ratio: float, T: float):
    """The loss the obvious way: every logit kept, torch's own softmaxes."""
    logits = h @ w.T
    p = torch.softmax(top_logits / T, -1)
    log_q = torch.log_softmax(logits / T, -1).gather(1, top_ids)
    kd = T * T * (p * (p.log() - log_q)).sum()
    nll = F.cross_entropy(logits, t, reduction="sum")
    return ratio * kd + (1 - ratio) * nll, kd, nll


@pytest.mark.parametrize("chunk_floats", [203 * 4, 1 << 25])  # 4 rows a chunk; one chunk
@pytest.mark.parametrize(("ratio", "T"), [(0.5, 1.0), (0.8, 2.0), (1.0, 0.7), (0.0, 3.0)])
def test_value_and_gradients_equal_the_full_logits_version(monkeypatch, chunk_floats: int,
                                                           ratio: float, T: float) -> None:
    monkeypatch.setattr(cross_entropy, "CHUNK_FLOATS", chunk_floats)
    h, w, t, ids, zl = case()
    ours = linear_distill(h, w, t, ids, zl, ratio, T)
    (1.5 * ours.loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, kd, nll = full_logits_loss(h, w, t, ids, zl, ratio, T)
    (1.5 * loss).backward()
    torch.testing.assert_close(ours.loss, loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.kd, kd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll, nll, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)


def test_two_tokens_by_hand() -> None:
    # one hidden unit, weight rows [0, ln 2, 0]: the student's logits are [0, ln 2, 0] at both
    # positions, so q = [1/4, 1/2, 1/4] at T = 1
    h = torch.ones(2, 1)
    w = torch.tensor([[0.0], [math.log(2)], [0.0]])
    # position 1: teacher top-2 ids [1, 0] with logits [ln 3, 0] -> p = [3/4, 1/4], target 1
    # position 2: teacher top-2 ids [2, 1] with logits [0, 0] -> p = [1/2, 1/2], target 0
    ids = torch.tensor([[1, 0], [2, 1]])
    zl = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    t = torch.tensor([1, 0])
    kd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.25) \
        + 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.5)
    nll = -math.log(0.5) - math.log(0.25)
    got = linear_distill(h, w, t, ids, zl, ratio=0.25, temperature=1.0)
    assert got.kd.item() == pytest.approx(kd, rel=1e-6)
    assert got.nll.item() == pytest.approx(nll, rel=1e-6)
    assert got.loss.item() == pytest.approx(0.25 * kd + 0.75 * nll, rel=1e-6)

    # at T = 2 the first position's student is q ∝ [1, √2, 1], its teacher p ∝ [√3, 1] (ids 1, 0)
    p = [math.sqrt(3) / (1 + math.sqrt(3)), 1 / (1 + math.sqrt(3))]
    q = [math.sqrt(2) / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2))]
    one = linear_distill(h[:1], w, t[:1], ids[:1], zl[:1], ratio=1.0, temperature=2.0)
    assert one.kd.item() == pytest.approx(4 * sum(a * math.log(a / b) for a, b in zip(p, q)),
                                          rel=1e-6)


def test_a_student_equal_to_its_teacher_has_no_distillation_loss() -> None:
    h, w, t, _, _ = case(v=50)
    logits = (h @ w.T).detach()
    top_logits, top_ids = logits.topk(50, dim=-1)  # k = the whole vocabulary
    got = linear_distill(h, w, t, top_ids, top_logits, ratio=1.0, temperature=1.5)
    assert abs(got.kd.item()) < 1e-4
    got.loss.backward()
    assert h.grad.abs().max() < 1e-5  # and it is a minimum


def test_without_gradients_the_values_are_the_same() -> None:
    h, w, t, ids, zl = case()
    with_grad = linear_distill(h, w, t, ids, zl, 0.5, 2.0)
    with torch.no_grad():
        without = linear_distill(h, w, t, ids, zl, 0.5, 2.0)
    assert without.loss.item() == pytest.approx(with_grad.loss.item(), rel=1e-6)
    assert not without.loss.requires_grad and not with_grad.kd.requires_grad


def test_bf16_autocast_stays_close() -> None:
    h, w, t, ids, zl = case(n=64, d=64, v=512)
    ref = full_logits_loss(h, w, t, ids, zl, 0.5, 1.0)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_distill(h, w, t, ids, zl, 0.5, 1.0)
    ours.loss.backward()
    assert ours.loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert abs(ours.loss.item() - ref.item()) < 0.02 * abs(ref.item())


def test_no_rows_gives_a_zero_that_still_backpropagates() -> None:
    h, w, t, ids, zl = case()
    got = linear_distill(h[:0], w, t[:0], ids[:0], zl[:0])
    got.loss.backward()
    assert got.loss.item() == 0 and float(w.grad.abs().sum()) == 0


def test_bad_settings_are_refused() -> None:
    h, w, t, ids, zl = case()
    with pytest.raises(ValueError, match="ratio"):
        linear_distill(h, w, t, ids, zl, ratio=1.5)
    with pytest.raises(ValueError, match="temperature"):
        linear_distill(h, w, t, ids, zl, temperature=0.0)
    with pytest.raises(ValueError, match="positions"):
        linear_distill(h, w, t, ids[1:], zl[1:])


def test_on_a_packed_batch_with_no_distillation_it_is_the_sft_loss() -> None:
    model = make_tiny_model()
    examples = [Example([1, 5, 9, 3, 7], [False, False, True, True, True], "a"),
                Example([1, 4, 2], [False, True, True], "b")]
    batch = pack(examples, 16)
    n = int((batch.targets != IGNORE).sum())
    ids = torch.randint(0, TINY.vocab_size, (n, 4))
    got = distill_loss(model, batch, ids, torch.randn(n, 4), ratio=0.0)
    assert got.loss.item() == pytest.approx(sft_loss(model, batch).item(), rel=1e-6)
    assert got.kd.item() > 0
