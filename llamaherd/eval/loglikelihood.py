"""Log-likelihoods of text continuations after text contexts, tokenized as lm-eval does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamaherd.generation.scoring import SCORE_PASS_TOKENS, cache_set_aside, continuation_logprobs
from llamaherd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llamaherd.api import LLM

# how many questions (contexts) go to continuation_logprobs at a time, between progress reports
CHUNK = 64


@dataclass(frozen=True)
class LogLikelihood:
    """The log-probability of a continuation given its context, summed over its tokens."""

    logprob: float
    greedy: bool  # every continuation token is the most likely one at its position
    tokens: int  # how many tokens the continuation took


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token an empty context stands for: BOS, or EOS where the vocabulary has no BOS
    (lm-eval's `prefix_token_id`)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty "
                         "context")
    return token


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal models split them (TemplateLM's
    `loglikelihood` and `_encode_pair`): spaces that end the context move to the continuation,
    context + continuation is encoded whole (with BOS where the model adds one) and split after as
    many tokens as the context alone takes. An empty context is the prefix token alone."""
    if not context:
        ids = tokenizer.encode(continuation)
        first = prefix_token(tokenizer)
        return ([first], ids) if ids[:1] != [first] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=tokenizer.add_bos)
    context_ids = tokenizer.encode(context, bos=tokenizer.add_bos)
    return context_ids, whole[len(context_ids):]


def loglikelihoods(llm: LLM, requests: Sequence[tuple[str, str]], *,
                   budget: int = SCORE_PASS_TOKENS,
                   progress: Callable[[int, int], None] | None = None) -> list[LogLikelihood]:
    """The log-likelihood of each (context, continuation) under `llm`, in order.

    Requests whose contexts tokenize alike are scored together, the context computed once
    (generation.scoring.continuation_logprobs), in forward passes of about `budget` tokens, without
    the KV cache. A context too long for the window loses its oldest tokens, as in lm-eval.
    progress(done, total) is called as the contexts get scored.
    """
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, continuation) in enumerate(requests):
        context_ids, ids = encode_pair(llm.tokenizer, context, continuation)
        if not ids:
            raise ValueError(f"request {i}: the continuation {continuation!r} has no tokens of its "
                             "own (it merges into the context's last token)")
        groups.setdefault(tuple(context_ids), []).append((i, ids))
    window = llm.args.max_seq_len
    todo = []
    for context_ids, members in groups.items():
        longest = max(len(ids) for _, ids in members)
        if longest > window:
            raise ValueError(f"a continuation of {longest} tokens does not fit the context window "
                             f"of {window}")
        # lm-eval keeps the last window + 1 tokens of context + continuation (the last is only a
        # target): the context keeps at most window + 1 - longest tokens
        todo.append((list(context_ids[-(window + 1 - longest):]), members))
    out: list[LogLikelihood | None] = [None] * len(requests)
    with cache_set_aside(llm.model) as model:
        for a in range(0, len(todo), CHUNK):
            chunk = todo[a:a + CHUNK]
            scored = continuation_logprobs(
                model, [(context, [ids for _, ids in members]) for context, members in chunk],
                budget)
            for (_, members), results in zip(chunk, scored):
                for (i, ids), (logprobs, greedy) in zip(members, results):
                    out[i] = LogLikelihood(sum(logprobs), greedy, len(ids))
            if progress is not None:
                progress(min(a + CHUNK, len(todo)), len(todo))
    return [r for r in out if r is not None]
