"""Perplexity of a model on texts, scored with overlapping windows so each token counts once.

The windows are those of Hugging Face's perplexity guide ("Perplexity of fixed-length models",
strided sliding window): windows of `window` tokens start every `stride` tokens and each scores
only the tokens no earlier window scored, so each token is scored once, with up to window - 1
tokens of context (at least window - stride once the text outgrows a window). lm-eval's
loglikelihood_rolling is the same scheme with stride = window - 1 (disjoint windows whose first
token sees only the one before it) and a prefix token before the text, as corpus_perplexity uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llamaherd.eval.loglikelihood import prefix_token
from llamaherd.generation.scoring import SCORE_PASS_TOKENS, cache_set_aside, prompt_logprobs

if TYPE_CHECKING:
    from llamaherd.api import LLM

# The fixed evaluation text: about 2,900 words of plain English prose (a short story about a
# lighthouse keeper and an explanation of how bread is made), written for this project and
# released with it, so that no outside data set is needed to compare quantization modes.
EVAL_TEXT_PATH = Path(__file__).with_name("data") / "eval_text.txt"

LogitsFn = Callable[[list[int]], torch.Tensor]  # ids (T,) -> logits (T, vocab) of each position


def eval_text() -> str:
    """The fixed evaluation text shipped with the package."""
    return EVAL_TEXT_PATH.read_text(encoding="utf-8")


def token_nlls(logits: LogitsFn, ids: Sequence[int], *, window: int = 512,
               stride: int = 256) -> torch.Tensor:
    """Negative log-likelihood (float64) of each of ids[1:] given the tokens before it.

    Windows of `window` tokens start every `stride` tokens; each window scores only the tokens
    that no earlier window scored, so every token after the first is scored exactly once, with
    at least window - stride tokens of context once the text is longer than a window.
    """
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    ids = list(ids)
    nlls: list[torch.Tensor] = []
    with torch.inference_mode():
        for start, scored, end in windows(len(ids), window, stride):
            out = logits(ids[start:end])  # (end - start, vocab); row j predicts ids[start + j + 1]
            predictions = out[scored - start - 1:end - start - 1].float()
            targets = torch.tensor(ids[scored:end], device=predictions.device)
            nlls.append(F.cross_entropy(predictions, targets, reduction="none").double().cpu())
    return torch.cat(nlls)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first scored, end) of each window over n tokens: the window holds tokens
    start..end-1 and scores scored..end-1, so that tokens 1..n-1 are each scored once (token 0 has
    no context)."""
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got stride={stride}, window={window}")
    out = []
    scored = 1
    for start in range(0, n - 1, stride):
        end = min(start + window, n)
        out.append((start, scored, end))
        scored = end
        if end == n:
            break
    return out


def perplexity_of_ids(logits: LogitsFn, ids: Sequence[int], *, window: int = 512,
                      stride: int = 256) -> float:
    """exp(mean negative log-likelihood) of ids[1:], accumulated in float64."""
    return math.exp(token_nlls(logits, ids, window=window, stride=stride).mean().item())


def perplexity(llm: LLM, text: str, *, window: int = 512, stride: int = 256) -> float:
    """Perplexity of `llm` on `text` (tokenized with a BOS token when the model expects one).

    The model runs without its KV cache, `window` tokens at a time, advancing by `stride`.
    """
    ids = llm.tokenizer.encode_prompt(text)
    return perplexity_of_ids(llm.logits, ids, window=window, stride=stride)


@dataclass(frozen=True)
class Perplexity:
    """Totals over a corpus, each document scored on its own: tokens scored, their summed
    negative log-likelihood (nats) and the documents' UTF-8 bytes."""

    documents: int
    tokens: int
    nll: float
    bytes: int

    @property
    def perplexity(self) -> float:
        """exp(nll per token): token-level perplexity."""
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        """nll in bits per UTF-8 byte of text: comparable across tokenizers."""
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, float | int]:
        return {"documents": self.documents, "tokens": self.tokens, "nll": self.nll,
                "bytes": self.bytes, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def corpus_perplexity(llm: LLM, texts: Iterable[str], *, window: int = 512, stride: int = 256,
                      budget: int = SCORE_PASS_TOKENS,
                      progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of `llm` over documents, each scored on its own with sliding windows.

    Each document starts with the prefix token (BOS, or EOS where there is no BOS; lm-eval's
    rolling log-likelihood does the same), so every token of its text is scored. The windows of all
    documents go through generation.scoring.prompt_logprobs, packed into forward passes of about
    `budget` tokens, without the KV cache.
    """
    if window > llm.args.max_seq_len:
        raise ValueError(f"the window of {window} tokens exceeds the context window of "
                         f"{llm.args.max_seq_len}")
    tok = llm.tokenizer
    spans: list[tuple[list[int], int]] = []  # (window's tokens, how many of its first aren't scored)
    documents = n_bytes = 0
    for text in texts:
        ids = [prefix_token(tok), *tok.encode(text)]
        documents += 1
        n_bytes += len(text.encode("utf-8"))
        if len(ids) > 1:
            spans += [(ids[start:end], scored - start) for start, scored, end in
                      windows(len(ids), window, stride)]
    if n_bytes == 0:
        raise ValueError("no text to score")
    nll, tokens = 0.0, 0
    with cache_set_aside(llm.model) as model:
        for a in range(0, len(spans), 64):
            chunk = spans[a:a + 64]
            for (ids, skip), entries in zip(chunk, prompt_logprobs(model, [s for s, _ in chunk],
                                                                   budget=budget)):
                nll -= math.fsum(e.logprob for e in entries[skip:] if e is not None)
                tokens += len(ids) - skip
            if progress is not None:
                progress(min(a + 64, len(spans)), len(spans))
    return Perplexity(documents, tokens, nll, n_bytes)
