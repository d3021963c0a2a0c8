"""Prompt scoring: the log-probability of every prompt token given the tokens before it.

This is what OpenAI's `echo` with `logprobs` returns, and what lm-evaluation-harness sums to
compare the answers of a multiple-choice question. The prompts go through the model without a
KV cache, packed side by side into rows of up to SCORE_PASS_TOKENS tokens (each prompt its own
document of the row: its positions start at 0 and its attention stays inside it, as in packed
training rows), so that many short prompts take one forward pass and no padding; a longer prompt
takes a pass of its own. The vocabulary-wide log-softmax is taken over HEAD_CHUNK positions at a
time, so the logits of a long prompt never exist all at once.
"""

from __future__ import annotations

import torch

from llamaherd.generation.sampling import TokenLogprob
from llamaherd.model import Transformer

SCORE_PASS_TOKENS = 1024  # tokens packed into one forward pass (one prompt may take more)
HEAD_CHUNK = 256  # positions whose logits are computed at once

# one entry per prompt token: None for the first (nothing comes before it), else the token's
# log-probability and the `top` most likely tokens at its position
PromptLogprobs = list[TokenLogprob | None]


def passes(lengths: list[int], budget: int = SCORE_PASS_TOKENS) -> list[list[int]]:
    """Prompt indices grouped into forward passes of at most `budget` tokens each, in order (a
    prompt longer than the budget alone in its pass)."""
    out: list[list[int]] = []
    used = budget
    for i, n in enumerate(lengths):
        if used + n > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


@torch.inference_mode()
def prompt_logprobs(model: Transformer, prompts: list[list[int]], top: int = 0,
                    budget: int = SCORE_PASS_TOKENS) -> list[PromptLogprobs]:
    """Every prompt token's log-probability under `model` (which must hold no KV cache; see
    Engine.score) with the `top` most likely tokens at each position, in float32."""
    if any(not p for p in prompts):
        raise ValueError("a prompt to score is empty")
    if any(layer.attention.cache is not None for layer in model.layers):
        raise ValueError("prompt_logprobs runs without a KV cache; set the model's aside first")
    out: list[PromptLogprobs] = [[] for _ in prompts]
    device = model.rope_freqs.device
    for group in passes([len(p) for p in prompts], budget):
        ids = [t for i in group for t in prompts[i]]
        tokens = torch.tensor([ids], device=device)  # (1, N)
        if len(group) == 1:  # one prompt: plain causal attention
            h = model.blocks(tokens)
        else:  # several: each its own document, positions restarting at 0
            pos = torch.cat([torch.arange(len(prompts[i]), device=device) for i in group])
            docs = torch.cat([torch.full((len(prompts[i]),), d, device=device)
                              for d, i in enumerate(group)])
            h = model.blocks(tokens, pos[None], documents=docs[None])
        h = h[0]  # (N, dim)
        start = 0
        for i in group:
            n = len(prompts[i])
            out[i] = _score_one(model, h[start:start + n], prompts[i], top)
            start += n
    return out


def _score_one(model: Transformer, h: torch.Tensor, prompt: list[int],
               top: int) -> PromptLogprobs:
    """One prompt's entries from its hidden states h (T, dim): position t - 1 predicts token t."""
    entries: PromptLogprobs = [None]
    targets = torch.tensor(prompt[1:], device=h.device)
    for a in range(0, len(prompt) - 1, HEAD_CHUNK):
        b = min(len(prompt) - 1, a + HEAD_CHUNK)
        logp = torch.log_softmax(model.head(h[a:b]).float(), dim=-1)  # (C, V)
        chosen = logp.gather(1, targets[a:b, None])[:, 0].tolist()
        if top > 0:
            values, ids = torch.topk(logp, top, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in range(b - a)]
        entries += [TokenLogprob(t, lp, tp) for t, lp, tp in zip(prompt[a + 1:b + 1], chosen, tops)]
    return entries
