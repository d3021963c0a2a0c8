"""One sequence being generated: its tokens, sampling state, RNG, text stream and stop rules."""

from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from llamaherd.generation.sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    token_logprob,
)
from llamaherd.generation.text import TextStream
from llamaherd.tokenizer import Tokenizer

_ids = itertools.count()


@dataclass
class Event:
    """What one step produced for one sequence.

    token_id is None only for an event that carries no new token (a cancelled sequence).
    finish_reason is set on the sequence's last event: "stop" (stop token or stop string),
    "length" (max_new_tokens or the context window reached), "cancelled", or "tool_calls"
    (set by the chat layer).
    """

    seq: Sequence
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class Sequence:
    """Per-sequence state; the engine (or the speculative decoder) feeds it tokens."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 max_len: int, seed_offset: int = 0, truncated: int = 0) -> None:
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_len = max_len  # prompt + output may not exceed this (the context window)
        self.truncated = truncated  # prompt tokens dropped to fit the window
        self.output_ids: list[int] = []
        self.text = ""  # emitted text so far
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.draft_stats: Any = None  # SpeculativeStats when decoded speculatively
        self.prompt_index = 0  # which prompt of a request this answers, set by generate_stream
        self.row = -1  # cache row, set by the engine
        self.pos = 0  # number of tokens whose keys/values are in the cache
        self.cached_tokens = 0  # prompt tokens found in the cache (prefix caching), not prefilled
        self.next_input: int | None = None  # the last sampled token, not fed to the model yet
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= tokenizer.stop_ids
        self.stream = TextStream(tokenizer.stream_decoder(), params.stop)
        seed = secrets.randbits(63) if params.seed is None else params.seed + seed_offset
        self.generator = torch.Generator().manual_seed(seed)
        self.seen: torch.Tensor | None = None  # (V,) bool: tokens in prompt or output
        self.counts: torch.Tensor | None = None  # (V,) generated-token counts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def biases(self) -> list[tuple[int, float]]:
        """(token id, bias) to add to this sequence's next logits: its logit_bias, and -inf for
        each stop token while it has fewer than min_tokens tokens."""
        out = list(self.params.logit_bias.items())
        if len(self.output_ids) < self.params.min_tokens:
            out += [(t, -math.inf) for t in self.stop_ids]
        return out

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This sequence's logits row (V,) after its penalties and logits processors (the same
        tensor when it has none): what its next token is sampled from."""
        p = self.params
        if p.penalized:
            self._init_penalty_state(logits)
            logits = apply_penalties(logits, self.seen, self.counts, p.repetition_penalty,
                                     p.presence_penalty, p.frequency_penalty)
        for processor in p.logits_processors:
            logits = processor(self.output_ids, logits)
        return logits

    def logprob(self, raw: torch.Tensor, token: int) -> TokenLogprob | None:
        """The chosen token's log-probability under the raw logits, if this sequence asked."""
        k = self.params.logprobs
        return None if k is None else token_logprob(raw, token, k)

    def _init_penalty_state(self, logits: torch.Tensor) -> None:
        if self.seen is not None:
            return
        V = logits.shape[-1]
        ids = torch.tensor(self.all_ids, dtype=torch.long, device=logits.device)
        self.seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
        self.seen[ids[ids < V]] = True
        self.counts = torch.zeros(V, dtype=torch.float32, device=logits.device)
        out = torch.tensor(self.output_ids, dtype=torch.long, device=logits.device)
        self.counts.index_add_(0, out, torch.ones_like(out, dtype=torch.float32))

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> Event:
        """Record a sampled token and apply the stop rules; returns the event to report."""
        if self.seen is not None and self.counts is not None and token_id < self.seen.shape[0]:
            self.seen[token_id] = True
            self.counts[token_id] += 1
        if token_id in self.stop_ids:
            self.stop_reason = token_id
            return self._finish("stop", self.stream.finish(), token_id, logprob)
        self.output_ids.append(token_id)
        self.next_input = token_id
        delta, stop = self.stream.push(token_id)
        if stop is not None:
            self.stop_reason = stop
            return self._finish("stop", delta, token_id, logprob)
        if len(self.output_ids) >= self.params.max_new_tokens or \
                len(self.prompt_ids) + len(self.output_ids) >= self.max_len:
            return self._finish("length", delta + self.stream.finish(), token_id, logprob)
        self.text += delta
        return Event(self, token_id, delta, logprob)

    def cancel(self) -> Event:
        return self._finish("cancelled", "", None, None)

    def _finish(self, reason: str, delta: str, token_id: int | None,
                logprob: TokenLogprob | None) -> Event:
        self.finish_reason = reason
        self.next_input = None
        self.text += delta
        return Event(self, token_id, delta, logprob, reason)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, row={self.row}, prompt={len(self.prompt_ids)}, "
                f"output={len(self.output_ids)}, finish={self.finish_reason})")
