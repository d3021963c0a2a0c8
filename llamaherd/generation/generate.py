"""generate_stream: the one loop over the engine, and the completions built from its events."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from llamaherd.generation.engine import Engine
from llamaherd.generation.sampling import SamplingParams, TokenLogprob
from llamaherd.generation.sequence import Event, Sequence
from llamaherd.runtime import Runner
from llamaherd.tokenizer import Tokenizer


@dataclass
class Completion:
    """One finished sequence. token_ids holds the new tokens only (a stop token excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    truncated: int = 0  # prompt tokens dropped to fit the context window
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    prompt_index: int = 0  # which prompt of the request this completes
    acceptance_rate: float | None = None  # share of draft tokens accepted (speculative decoding)
    cached_tokens: int = 0  # prompt tokens reused from the KV cache instead of prefilled

    @classmethod
    def from_sequence(cls, seq: Sequence, logprobs: list[TokenLogprob] | None) -> Completion:
        rate = seq.draft_stats.acceptance_rate if seq.draft_stats is not None else None
        return cls(seq.text, list(seq.output_ids), seq.finish_reason or "cancelled", logprobs,
                   len(seq.prompt_ids), seq.truncated, seq.stop_reason, seq.prompt_index, rate,
                   seq.cached_tokens)


def generate_stream(engine: Engine, prompts: list[list[int]],
                    params: SamplingParams | list[SamplingParams]) -> Iterator[Event]:
    """Events for params.n completions of each prompt, in the order the engine produces them.

    `params` is one SamplingParams for every prompt, or a list with one per prompt (a stateful
    logits processor belongs to one sequence). Prompts join the engine as soon as enough cache
    rows are free, so more prompts than rows simply queue. Closing the iterator early (or an
    exception in the consumer, such as Ctrl-C) cancels the sequences still running.
    """
    each = per_prompt(params, len(prompts))
    for p, pp in zip(prompts, each):  # fail before anything starts
        if pp.n > engine.rows:
            raise ValueError(f"n={pp.n} completions need {pp.n} cache rows; the engine "
                             f"has {engine.rows}")
        engine.fit_prompt(p, pp)
    queue = list(enumerate(zip(prompts, each)))
    mine: set[int] = set()  # ids of this request's sequences still running
    started: list[Sequence] = []
    try:
        while queue or mine:
            while queue and engine.free_rows >= queue[0][1][1].n:
                index, (prompt, pp) = queue.pop(0)
                for s in engine.add_group(prompt, pp):
                    s.prompt_index = index
                    mine.add(s.id)
                    started.append(s)
            for event in engine.step():
                if event.seq.id in mine:
                    if event.finish_reason is not None:
                        mine.discard(event.seq.id)
                    yield event
    finally:
        for s in started:
            if not s.finished:
                engine.cancel(s)


def per_prompt(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the same one n times, or a list of n checked."""
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling settings for {n} prompts")
    return list(params)


def collect(events: Iterable[Event]) -> list[Completion]:
    """Completions from a finished event stream, ordered by prompt, then by sequence."""
    seqs: dict[int, Sequence] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    for e in events:
        seqs.setdefault(e.seq.id, e.seq)
        if e.logprob is not None:
            logprobs.setdefault(e.seq.id, []).append(e.logprob)
    done = [Completion.from_sequence(s, logprobs.get(i, []) if s.params.logprobs is not None
                                     else None) for i, s in seqs.items()]
    return sorted(done, key=lambda c: c.prompt_index)  # stable: n completions keep their order


@dataclass
class PromptBatch:
    """Prompts as token-id lists, and whether the caller passed a single prompt."""

    ids: list[list[int]]
    single: bool


def to_token_ids(tokenizer: Tokenizer, prompt_or_prompts: Any) -> PromptBatch:
    """A str, a list of ints (one prompt) or a list of str / int lists (many) -> token ids.

    Text is encoded with Tokenizer.encode_prompt (a BOS token when the model expects one).
    """
    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            return tokenizer.encode_prompt(p)
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            if not p:
                raise ValueError("a prompt is empty")
            return list(p)
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(p).__name__}")

    if isinstance(prompt_or_prompts, str):
        return PromptBatch([one(prompt_or_prompts)], True)
    if isinstance(prompt_or_prompts, (list, tuple)):
        if not prompt_or_prompts:
            raise ValueError("no prompt given")
        if all(isinstance(t, int) for t in prompt_or_prompts):
            return PromptBatch([one(prompt_or_prompts)], True)
        return PromptBatch([one(p) for p in prompt_or_prompts], False)
    # a tensor of ids, for convenience
    if hasattr(prompt_or_prompts, "tolist"):
        return to_token_ids(tokenizer, prompt_or_prompts.tolist())
    raise TypeError(f"a prompt must be a str or a list of token ids, got "
                    f"{type(prompt_or_prompts).__name__}")


def sized_engine(engine: Engine | None, runner: Runner, tokenizer: Tokenizer,
                 prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> Engine:
    """`engine` if it is idle and big enough for these prompts, else a new one that is.

    The cache gets one row per completion (up to 16 at once, more queue) and room for the longest
    prompt plus max_new_tokens, rounded up to 256 positions and capped at the context window.
    """
    window = runner.model.args.max_seq_len
    each = per_prompt(params, len(prompts))
    n = max(p.n for p in each)
    rows = max(n, min(16, n * len(prompts)))
    need = max(len(p) + pp.max_new_tokens for p, pp in zip(prompts, each))
    max_len = min(window, -(-need // 256) * 256)
    if engine is not None and engine.runner is runner and engine.rows >= rows and \
            engine.max_len >= max_len:
        return engine
    if engine is not None and not engine.idle:
        raise RuntimeError("a generation on this model is still running; finish or close its "
                           "stream before starting one that needs a bigger cache")
    if engine is not None:
        rows, max_len = max(rows, engine.rows), max(max_len, engine.max_len)
    return Engine(runner, tokenizer, rows=rows, max_len=max_len)
