"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one forward.

Greedy only, so the output is exactly what plain greedy decoding gives: the target's own argmax
decides every token, and a draft token counts only where it equals that argmax. Rejected positions
need no clean-up in the cache: the next forward writes over them before any query can see them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from llamaherd.generation.engine import Engine
from llamaherd.generation.sampling import SamplingParams, token_logprob
from llamaherd.generation.sequence import Event, Sequence
from llamaherd.runtime import Runner


class Drafter(Protocol):
    def propose(self, ids: list[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `ids`."""
        ...


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and copy what followed."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: list[int], k: int) -> list[int]:
        L = len(ids)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = ids[L - n:]
            for start in range(L - n - 1, -1, -1):  # latest match first
                if ids[start:start + n] == tail:
                    return ids[start + n:start + n + k]
        return []


class ModelDrafter:
    """A smaller model sharing the target's vocabulary, decoding greedily with its own cache."""

    def __init__(self, runner: Runner, max_len: int) -> None:
        self.runner = runner
        self.max_len = min(max_len, runner.model.args.max_seq_len)
        self.device = runner.device
        runner.setup_cache(1, self.max_len)
        self.cached: list[int] = []  # the tokens whose keys/values are in the draft cache

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int) -> list[int]:
        k = min(k, self.max_len - len(ids))
        if k <= 0:
            return []
        valid = 0  # the cache is right up to the first token that differs from `ids`
        for a, b in zip(self.cached, ids[:len(ids) - 1]):
            if a != b:
                break
            valid += 1
        new = ids[valid:]
        pos = torch.arange(valid, len(ids), device=self.device)[None]
        logits = self.runner.forward(torch.tensor([new], device=self.device), pos,
                                     output_index=torch.tensor([len(new) - 1], device=self.device))
        self.cached = list(ids)
        out = [int(logits[0].argmax())]
        while len(out) < k:
            tok = torch.tensor([[out[-1]]], device=self.device)
            pos = torch.tensor([[len(self.cached)]], device=self.device)
            self.cached.append(out[-1])
            out.append(int(self.runner.forward(tok, pos)[0, -1].argmax()))
        return out


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target agreed with
    target_forwards: int = 0
    tokens: int = 0  # tokens produced

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SpeculativeDecoder:
    """Greedy decoding of one sequence on `engine`, k draft tokens verified per target forward."""

    def __init__(self, engine: Engine, drafter: Drafter, k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(drafter, ModelDrafter) and drafter.runner.model is engine.model:
            raise ValueError("the draft model must be a separate model object (it needs its own "
                             "cache); load it a second time to let a model draft for itself")
        self.engine, self.drafter, self.k = engine, drafter, k
        self.stats = SpeculativeStats()

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Event]:
        if (not params.greedy or params.penalized or params.logits_processors or params.n != 1
                or params.logit_bias or params.min_tokens):
            raise ValueError("speculative decoding is greedy only: temperature 0, no penalties, "
                             "logit bias, min_tokens or logits processors, n=1")
        if not self.engine.idle:
            raise RuntimeError("speculative decoding needs the engine to itself")
        seq = self.engine.add(prompt_ids, params)
        seq.draft_stats = self.stats
        try:
            events = self.engine.step()  # prefill and the first token
            self.stats.target_forwards += 1
            self.stats.tokens += 1
            yield from events
            while not seq.finished:
                room = min(self.k, seq.max_len - seq.pos - 1,
                           params.max_new_tokens - len(seq.output_ids) - 1)
                draft = self.drafter.propose(seq.all_ids, room)[:max(room, 0)]
                yield from self._verify(seq, draft, params)
        finally:
            self.engine.cancel(seq)

    @torch.inference_mode()
    def _verify(self, seq: Sequence, draft: list[int], params: SamplingParams) -> Iterator[Event]:
        tokens = [seq.next_input] + draft
        logits = self.engine.extend(seq, tokens)  # (1 + len(draft), V)
        target = logits.argmax(-1).tolist()
        self.stats.target_forwards += 1
        self.stats.drafted += len(draft)
        accepted = 0
        for i, token in enumerate(target):  # target[i] follows tokens[i]
            info = (token_logprob(logits[i], token, params.logprobs)
                    if params.logprobs is not None else None)
            event = seq.append(token, info)
            self.stats.tokens += 1
            yield event
            if event.finish_reason is not None or i == len(draft) or draft[i] != token:
                break
            accepted += 1  # draft[i] was what the target would have picked
        self.stats.accepted += accepted
        seq.pos += accepted + 1  # the fed token and the accepted drafts are now in the cache


def speculative_stream(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                       draft: str | Runner, k: int = 4) -> Iterator[Event]:
    """Greedy events for each prompt in turn; draft is "ngram" (prompt lookup) or a draft model's
    Runner (not the target model object itself). Each sequence's `draft_stats` holds its
    SpeculativeStats."""
    if isinstance(draft, str):
        if draft != "ngram":
            raise ValueError(f"draft must be 'ngram' or a model, got {draft!r}")
        drafter: Drafter = NgramDrafter()
    else:
        drafter = ModelDrafter(draft, engine.max_len)
    for prompt in prompts:
        yield from SpeculativeDecoder(engine, drafter, k).stream(prompt, params)
