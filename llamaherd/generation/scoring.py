"""Prompt scoring: the log-probability of every prompt token given the tokens before it.

This is what OpenAI's `echo` with `logprobs` returns, and what lm-evaluation-harness sums to
compare the answers of a multiple-choice question. The prompts go through the model without a
KV cache, packed side by side into rows of up to SCORE_PASS_TOKENS tokens (each prompt its own
document of the row: its positions start at 0 and its attention stays inside it, as in packed
training rows), so that many short prompts take one forward pass and no padding; a longer prompt
takes a pass of its own. The vocabulary-wide log-softmax is taken over HEAD_CHUNK positions at a
time, so the logits of a long prompt never exist all at once.

continuation_logprobs scores answers after a shared context (what a multiple-choice evaluation
asks): each context is computed once, as the shared prefix of a row its answers continue.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llamaherd.generation.sampling import TokenLogprob
from llamaherd.model import SHARED, Transformer

SCORE_PASS_TOKENS = 1024  # tokens packed into one forward pass (one prompt may take more)
HEAD_CHUNK = 256  # positions whose logits are computed at once

# one entry per prompt token: None for the first (nothing comes before it), else the token's
# log-probability and the `top` most likely tokens at its position
PromptLogprobs = list[TokenLogprob | None]


@contextmanager
def cache_set_aside(model: Transformer) -> Iterator[Transformer]:
    """The model without its KV cache for the duration (the cache is put back after, untouched)."""
    saved = [layer.attention.cache for layer in model.layers]
    model.drop_cache()
    try:
        yield model
    finally:
        for layer, cache in zip(model.layers, saved):
            layer.attention.cache = cache


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


# A context and the continuations to score after it: (context ids, [continuation ids, ...])
ContinuationGroup = tuple[list[int], list[list[int]]]
PAD_DOCUMENT = -3  # the document id of a padded row's filler (it attends only to itself)


def _continuation_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices in batches of rows padded to their longest, at most `budget` tokens each
    (a longer row alone); groups of similar length batch together (longest first)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def continuation_logprobs(model: Transformer, groups: list[ContinuationGroup],
                          budget: int = SCORE_PASS_TOKENS) -> list[list[tuple[list[float], bool]]]:
    """For each group, each continuation's token log-probabilities given the context and the
    continuation's earlier tokens, and whether each of its tokens is the most likely one (greedy).

    The context is computed once per group: a row holds the context as its shared prefix (document
    SHARED, positions 0..C-1) and every continuation but its last token (only ever a target) after
    it as a document of its own (positions C.. again), so a question's answers cost their own
    tokens only. Rows are batched up to `budget` tokens (padded to the longest of the batch), and
    the output projection runs only at the positions that predict a continuation token. `model`
    must hold no KV cache.
    """
    if any(not context or not conts or not all(conts) for context, conts in groups):
        raise ValueError("every group needs a context and non-empty continuations")
    if any(layer.attention.cache is not None for layer in model.layers):
        raise ValueError("continuation_logprobs runs without a KV cache; set the model's aside")
    device = model.rope_freqs.device
    out: list[list[tuple[list[float], bool]]] = [[] for _ in groups]
    lengths = [len(c) + sum(len(x) - 1 for x in conts) for c, conts in groups]
    for batch in _continuation_batches(lengths, budget):
        T = max(lengths[g] for g in batch)
        tokens = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.zeros(len(batch), T, dtype=torch.long)
        docs = torch.full((len(batch), T), PAD_DOCUMENT, dtype=torch.long)
        rows, where, targets = [], [], []  # per predicted token: batch row, position, target
        for b, g in enumerate(batch):
            context, conts = groups[g]
            C = len(context)
            tokens[b, :C] = torch.tensor(context)
            pos[b, :C] = torch.arange(C)
            docs[b, :C] = SHARED
            start = C
            for d, cont in enumerate(conts):
                n = len(cont) - 1  # the inputs: all but the last token
                tokens[b, start:start + n] = torch.tensor(cont[:-1])
                pos[b, start:start + n] = torch.arange(C, C + n)
                docs[b, start:start + n] = d
                # the context's last token predicts the first; each input the token after it
                where += [C - 1, *range(start, start + n)]
                rows += [b] * len(cont)
                targets += cont
                start += n
        h = model.blocks(tokens.to(device), pos.to(device), documents=docs.to(device))
        h = h[torch.tensor(rows, device=device), torch.tensor(where, device=device)]  # (N, dim)
        target = torch.tensor(targets, device=device)
        chosen, greedy = [], []
        for a in range(0, len(targets), HEAD_CHUNK):
            logp = torch.log_softmax(model.head(h[a:a + HEAD_CHUNK]).float(), dim=-1)  # (C, V)
            chosen += logp.gather(1, target[a:a + HEAD_CHUNK, None])[:, 0].tolist()
            greedy += (logp.argmax(-1) == target[a:a + HEAD_CHUNK]).tolist()
        k = 0
        for g in batch:
            for cont in groups[g][1]:
                out[g].append((chosen[k:k + len(cont)], all(greedy[k:k + len(cont)])))
                k += len(cont)
    return out
