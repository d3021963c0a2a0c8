"""Knowledge distillation from a teacher's cached top-k logits, mixed with the next-token NLL.

At each trained position the teacher gives its k largest logits and their token ids. Its
distribution is those k logits renormalized at temperature T, p = softmax(z / T); the student's
log-probabilities at the same ids come from its full vocabulary at temperature T,
log q = s / T - logsumexp(s / T). The distillation term is the forward KL(p || q) scaled by T^2
(Hinton et al. 2015, so that its gradients keep their size as T changes), and

    loss = ratio * T^2 * sum_j p_j (log p_j - log q_j) + (1 - ratio) * NLL(next token)

summed over the trained positions. As in cross_entropy.py the student's logits are made a chunk
of rows at a time and never kept: the gradient with respect to a chunk's logits is
ratio * T * (softmax(s / T) - p scattered over the ids) + (1 - ratio) * (softmax(s) - one-hot).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from llamaherd.model import Transformer
from llamaherd.train.losses import cross_entropy
from llamaherd.train.packing import IGNORE, Batch


class DistillTerms(NamedTuple):
    """Sums over the trained positions (float32 scalars); only `loss` carries gradients."""

    loss: torch.Tensor  # ratio * kd + (1 - ratio) * nll
    kd: torch.Tensor  # T^2 * KL(teacher top-k || student)
    nll: torch.Tensor  # NLL of the true next tokens


def teacher_probs(top_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's top-k logits (N, k) as a distribution over those k ids at `temperature`."""
    return torch.softmax(top_logits.float() / temperature, dim=-1)


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                targets: torch.Tensor, top_ids: torch.Tensor, top_logits: torch.Tensor,
                ratio: float, temperature: float, grads: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(h.dtype, torch.float32)  # float32 even under autocast
        # `grads`: the caller's grad mode (here always off), so that evaluation skips the work
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if need_w else None)
        kd = torch.zeros((), dtype=torch.float32, device=h.device)
        nll = torch.zeros((), dtype=torch.float32, device=h.device)
        T = temperature
        chunk = max(1, cross_entropy.CHUNK_FLOATS // weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, h.shape[0], chunk):
                hc, tc = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                ids = top_ids[i:i + chunk].long()
                p = teacher_probs(top_logits[i:i + chunk], T)  # (n, k)
                logits = (hc @ w.T).float()  # (n, V)
                lse = logits.logsumexp(-1)
                scaled = logits / T
                lse_t = scaled.logsumexp(-1)
                log_q = scaled.gather(1, ids) - lse_t[:, None]  # (n, k)
                # p log p with 0 log 0 = 0 (a teacher logit far below the others underflows)
                kd += T * T * (torch.xlogy(p, p) - p * log_q).sum()
                nll += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
                if need_h or need_w:
                    d = scaled.sub_(lse_t[:, None]).exp_()  # softmax(s / T)
                    d.scatter_add_(1, ids, -p).mul_(ratio * T)
                    soft = logits.sub_(lse[:, None]).exp_()  # softmax(s); logits are spent
                    soft[torch.arange(len(tc)), tc] -= 1
                    d.add_(soft, alpha=1 - ratio)
                    if need_h:
                        grad_h[i:i + chunk] = (d @ w).to(h.dtype)
                    if need_w:
                        grad_w.addmm_(d.T, hc.float())
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kd, nll)
        return ratio * kd + (1 - ratio) * nll, kd, nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_: torch.Tensor):  # type: ignore[override]
        saved = list(ctx.saved_tensors)  # this call's own buffers: scaled in place
        need_h, need_w = ctx.has
        grad_h = saved.pop(0).mul_(grad) if need_h else None
        grad_w = saved.pop(0).mul_(grad).to(ctx.weight_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None, None


def linear_distill(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   top_ids: torch.Tensor, top_logits: torch.Tensor, ratio: float = 0.5,
                   temperature: float = 1.0) -> DistillTerms:
    """The distillation loss of hidden states h (N, D) under the output projection weight (V, D):
    `targets` (N,) the true next tokens, `top_ids` and `top_logits` (N, k) the teacher's top-k
    ids and raw logits at the same positions. Differentiable in h and weight; float32 even
    under autocast; the logits are never kept whole."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"the distillation ratio must be in [0, 1], got {ratio}")
    if temperature <= 0:
        raise ValueError(f"the temperature must be > 0, got {temperature}")
    if top_ids.shape != top_logits.shape or top_ids.shape[0] != h.shape[0]:
        raise ValueError(f"teacher top-k {tuple(top_ids.shape)} / {tuple(top_logits.shape)} "
                         f"does not match {h.shape[0]} positions")
    if h.shape[0] == 0:
        zero = (h.sum() + weight.sum()) * 0.0
        return DistillTerms(zero, zero.detach(), zero.detach())
    loss, kd, nll = _LinearDistill.apply(h, weight, targets, top_ids.to(h.device),
                                         top_logits.to(h.device), ratio, temperature,
                                         torch.is_grad_enabled())
    return DistillTerms(loss, kd, nll)


def distill_loss(model: Transformer, batch: Batch, top_ids: torch.Tensor,
                 top_logits: torch.Tensor, ratio: float = 0.5,
                 temperature: float = 1.0) -> DistillTerms:
    """The distillation loss of a packed batch: `top_ids` and `top_logits` (N, k) hold the
    teacher's top-k at the batch's N trained positions in row-major order (the order of
    `batch.targets != IGNORE`)."""
    h = model.hidden_states(batch.tokens, batch.positions, documents=batch.documents)
    keep = batch.targets != IGNORE
    return linear_distill(h[keep], model.output.weight, batch.targets[keep], top_ids,
                          top_logits, ratio, temperature)
