"""Cross-entropy of a linear layer's logits without keeping the logits.

The output projection of a 49k-token vocabulary turns every trained position into 49k logits;
keeping them for the backward pass (as `F.cross_entropy(h @ W.T, t)` does) costs more memory
than the rest of a small model's training step. Here the logits are made a chunk of rows at a
time, and each chunk's gradients with respect to the hidden states and the weight are computed
at once, so only those gradients outlive the chunk.
"""

from __future__ import annotations

import torch

# Rows of logits a chunk holds: about 2**24 floats (64 MB) whatever the vocabulary.
CHUNK_FLOATS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                targets: torch.Tensor) -> torch.Tensor:
        # float32 (or wider) even under autocast: the products are a small share of a step, and
        # lower precision would cost weight-sized casts and temporaries for little time saved
        dtype = torch.promote_types(h.dtype, torch.float32)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32)
        chunk = max(1, CHUNK_FLOATS // weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, h.shape[0], chunk):
                hc, tc = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                logits = (hc @ w.T).float()  # (n, V), float32
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
                if need_h or need_w:  # d(sum of NLL)/d logits = softmax - one-hot
                    d = logits.sub_(lse[:, None]).exp_()
                    d[torch.arange(len(tc)), tc] -= 1
                    if need_h:
                        grad_h[i:i + chunk] = (d @ w).to(h.dtype)
                    if need_w:
                        grad_w.addmm_(d.T, hc.float())  # in place: no weight-sized temporary
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved = list(ctx.saved_tensors)  # this call's own buffers: scaled in place
        need_h, need_w = ctx.has
        grad_h = saved.pop(0).mul_(grad) if need_h else None
        grad_w = saved.pop(0).mul_(grad).to(ctx.weight_dtype) if need_w else None
        return grad_h, grad_w, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """The summed negative log-likelihood of `targets` (N,) under softmax(h @ weight.T) for
    hidden states h (N, D) and an output projection weight (V, D), in float32; differentiable
    in h and weight. Computed in float32 even under autocast."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()) * 0.0
    return _LinearCrossEntropy.apply(h, weight, targets)


class _LinearLogProbs(torch.autograd.Function):
    """Per-row log-probabilities: the gradient depends on each row's incoming gradient, so the
    backward pass makes each chunk's logits again (one more product than the summed loss)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(h.dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        chunk = max(1, CHUNK_FLOATS // weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, h.shape[0], chunk):
                logits = (h[i:i + chunk].to(dtype) @ w.T).float()
                lse[i:i + chunk] = logits.logsumexp(-1)
                out[i:i + chunk] = (logits.gather(1, targets[i:i + chunk, None])[:, 0]
                                    - lse[i:i + chunk])
        ctx.save_for_backward(h, weight, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(h.dtype, torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if need_w else None
        chunk = max(1, CHUNK_FLOATS // weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, h.shape[0], chunk):
                hc, tc, g = h[i:i + chunk].to(dtype), targets[i:i + chunk], grad[i:i + chunk]
                # d log p(t) / d logits = one-hot - softmax, times each row's incoming gradient
                d = (hc @ w.T).float().sub_(lse[i:i + chunk, None]).exp_().neg_()
                d[torch.arange(len(tc)), tc] += 1
                d.mul_(g[:, None])
                if need_h:
                    grad_h[i:i + chunk] = (d @ w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(d.T, hc.float())
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None


def linear_log_probs(h: torch.Tensor, weight: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """log softmax(h @ weight.T)[targets] for each row (N,), in float32, without keeping the
    logits; differentiable in h and weight (for sequence log-likelihoods: DPO, PPO)."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()).reshape(1)[:0] * 0.0
    return _LinearLogProbs.apply(h, weight, targets)
