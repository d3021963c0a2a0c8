"""Perplexity of a model on a text, scored with overlapping windows so each token counts once."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

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
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got stride={stride}, window={window}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    ids = list(ids)
    n = len(ids)
    nlls: list[torch.Tensor] = []
    scored = 1  # ids[0] has no context and is never scored
    with torch.inference_mode():
        for start in range(0, n - 1, stride):
            end = min(start + window, n)
            out = logits(ids[start:end])  # (end - start, vocab); row j predicts ids[start + j + 1]
            predictions = out[scored - start - 1:end - start - 1].float()
            targets = torch.tensor(ids[scored:end], device=predictions.device)
            nlls.append(F.cross_entropy(predictions, targets, reduction="none").double().cpu())
            scored = end
            if end == n:
                break
    return torch.cat(nlls)


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
