"""The chunked linear cross-entropy against torch's cross_entropy of the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaherd.train.losses import cross_entropy
from llamaherd.train.losses.cross_entropy import linear_cross_entropy, linear_log_probs


def case(n: int = 37, d: int = 24, v: int = 301, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("chunk_floats", [301 * 5, 1 << 25])  # 5 rows a chunk; one chunk
def test_loss_and_gradients_equal_the_full_logits_version(monkeypatch, chunk_floats: int) -> None:
    monkeypatch.setattr(cross_entropy, "CHUNK_FLOATS", chunk_floats)
    h, w, t = case()
    ours = linear_cross_entropy(h, w, t)
    (2.5 * ours).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (2.5 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)


def test_hand_computed_value() -> None:
    # logits [0, ln 3] for two tokens: p(target 1) = 3/4, p(target 0) = 1/4
    h = torch.tensor([[1.0], [1.0]])
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]])
    loss = linear_cross_entropy(h, w, torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(-(torch.log(torch.tensor(0.75)) +
                                          torch.log(torch.tensor(0.25))).item(), rel=1e-6)


def test_bf16_autocast_stays_close_and_grads_keep_their_dtypes() -> None:
    h, w, t = case(n=64, d=64, v=512)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t)
    ours.backward()
    assert ours.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert abs(ours.item() - ref.item()) < 0.02 * abs(ref.item())


def test_no_rows_gives_a_zero_that_still_backpropagates() -> None:
    h, w, _ = case()
    loss = linear_cross_entropy(h[:0], w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and w.grad is not None and float(w.grad.abs().sum()) == 0


@pytest.mark.parametrize("chunk_floats", [301 * 5, 1 << 25])
def test_log_probs_and_their_gradients_equal_log_softmax(monkeypatch, chunk_floats: int) -> None:
    monkeypatch.setattr(cross_entropy, "CHUNK_FLOATS", chunk_floats)
    h, w, t = case()
    weights = torch.linspace(-1, 2, len(t))  # a different incoming gradient on every row
    ours = linear_log_probs(h, w, t)
    (ours * weights).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)


def test_log_probs_of_no_rows_keep_the_graph() -> None:
    h, w, _ = case()
    out = linear_log_probs(h[:0], w, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0
