"""Sliding-window perplexity against independent NLL sums, corpus perplexity (packed scoring
passes, a prefix token per document) against the same windows, and int8 quality on the real
model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamaherd.api import load
from llamaherd.eval import (
    corpus_perplexity,
    eval_text,
    perplexity,
    perplexity_of_ids,
    token_nlls,
)
from llamaherd.eval.loglikelihood import prefix_token
from llamaherd.eval.perplexity import windows
from llamaherd.quant.weight_only import quantize_model
from tests.support.models import TINY, make_tiny_model

SHORT_TEXT = "The lamp had to be lit half an hour before sunset and put out after sunrise."


def logits_of(model: torch.nn.Module):
    return lambda ids: model(torch.tensor([ids]))[0]


def reference_nll(model: torch.nn.Module, context: list[int], target: int) -> float:
    """-log p(target | context) from one forward pass over exactly `context`."""
    with torch.no_grad():
        last = model(torch.tensor([context]))[0, -1].double()
    return -F.log_softmax(last, dim=-1)[target].item()


def test_perplexity_is_exp_of_the_mean_nll_of_every_token_after_the_first() -> None:
    model = make_tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    ids = ids.tolist()
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    nll = -sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids))) / (len(ids) - 1)
    got = perplexity_of_ids(logits_of(model), ids, window=64, stride=32)
    assert got == pytest.approx(math.exp(nll), rel=1e-5)


def test_every_token_is_scored_once_with_the_context_of_its_window() -> None:
    model = make_tiny_model()
    window, stride = 16, 6
    ids = torch.randint(0, TINY.vocab_size, (57,), generator=torch.Generator().manual_seed(2))
    ids = ids.tolist()
    nlls = token_nlls(logits_of(model), ids, window=window, stride=stride)
    assert nlls.dtype == torch.float64 and nlls.shape == (len(ids) - 1,)
    for i in range(1, len(ids)):
        # Token i is scored by the first window that contains it: the one starting at
        # k * stride for the smallest k with k * stride + window > i.
        start = max(0, math.floor((i - window) / stride) + 1) * stride
        assert nlls[i - 1].item() == pytest.approx(reference_nll(model, ids[start:i], ids[i]),
                                                   abs=1e-4), f"token {i}"


def test_sliding_windows_equal_one_window_when_the_text_fits(tiny_gguf_with_vocab) -> None:
    llm = load(tiny_gguf_with_vocab, dtype="float32")
    text = " ".join([SHORT_TEXT] * 3)
    n = len(llm.tokenizer.encode(text, bos=llm.tokenizer.add_bos))
    assert 40 < n <= 128, n
    one_window = perplexity(llm, text, window=128, stride=64)
    assert perplexity(llm, text, window=n, stride=n // 2) == pytest.approx(one_window, rel=1e-9)
    # With windows shorter than the text, later tokens see less context: a different number.
    assert perplexity(llm, text, window=24, stride=12) != pytest.approx(one_window, rel=1e-6)


def test_perplexity_of_text_matches_an_independent_computation(tiny_gguf_with_vocab) -> None:
    llm = load(tiny_gguf_with_vocab, dtype="float32")
    ids = llm.tokenizer.encode(SHORT_TEXT, bos=llm.tokenizer.add_bos)
    logits = llm.logits(ids).double()
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="mean").item()
    assert perplexity(llm, SHORT_TEXT) == pytest.approx(math.exp(nll), rel=1e-6)


@pytest.mark.parametrize("window, stride", [(8, 8), (8, 0), (8, 9)])
def test_bad_window_or_stride_is_a_value_error(window: int, stride: int) -> None:
    with pytest.raises(ValueError, match="stride < window"):
        token_nlls(logits_of(make_tiny_model()), [1, 2, 3], window=window, stride=stride)


def test_a_single_token_cannot_be_scored() -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_nlls(logits_of(make_tiny_model()), [1])


def test_windows_score_every_token_after_the_first_once() -> None:
    assert windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert windows(5, 8, 4) == [(0, 1, 5)]
    for n, window, stride in [(57, 16, 6), (100, 10, 9), (2, 3, 1)]:
        spans = windows(n, window, stride)
        scored = [t for _, first, end in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= window for start, _, end in spans)


def test_corpus_perplexity_sums_each_document_s_windows(tiny_gguf_with_vocab) -> None:
    llm = load(tiny_gguf_with_vocab, dtype="float32")
    texts = [" ".join([SHORT_TEXT] * 3), "Bread needs flour.", "Ünïcödé ✓ text."]
    tok = llm.tokenizer
    want_nll, want_tokens = 0.0, 0
    for text in texts:
        ids = [prefix_token(tok), *tok.encode(text)]  # every token of the text is scored
        nlls = token_nlls(llm.logits, ids, window=24, stride=10)
        want_nll += nlls.sum().item()
        want_tokens += len(nlls)
    for budget in (1, 4096):  # each window alone; all windows packed in one pass
        got = corpus_perplexity(llm, texts, window=24, stride=10, budget=budget)
        assert (got.documents, got.tokens) == (3, want_tokens)
        assert got.nll == pytest.approx(want_nll, rel=1e-6)
        assert got.bytes == sum(len(t.encode()) for t in texts)
        assert got.perplexity == pytest.approx(math.exp(want_nll / want_tokens), rel=1e-6)
        assert got.bits_per_byte == pytest.approx(want_nll / math.log(2) / got.bytes, rel=1e-6)


def test_corpus_perplexity_refuses_windows_past_the_context(tiny_gguf_with_vocab) -> None:
    llm = load(tiny_gguf_with_vocab, dtype="float32")
    with pytest.raises(ValueError, match="exceeds the context window of 128"):
        corpus_perplexity(llm, ["text"], window=256, stride=128)
    with pytest.raises(ValueError, match="no text"):
        corpus_perplexity(llm, [""], window=16, stride=8)


def test_eval_text_is_plain_english_of_a_few_thousand_words() -> None:
    text = eval_text()
    assert 2500 < len(text.split()) < 4000
    assert text.isascii()


def test_int8_stays_within_one_percent_of_float32_on_the_real_model(default_model_path) -> None:
    # The first 1024 tokens of the evaluation text in one window: about a third of the text (the
    # whole text takes minutes per mode); short prefixes make a noisier, harsher sample.
    llm = load(default_model_path, dtype="float32")
    ids = llm.tokenizer.encode(eval_text(), bos=llm.tokenizer.add_bos)[:1024]
    exact = perplexity_of_ids(llm.logits, ids, window=1024, stride=512)
    assert 5 < exact < 60, exact  # a working 135M model on plain English
    quantize_model(llm.model, "int8")
    int8 = perplexity_of_ids(llm.logits, ids, window=1024, stride=512)
    assert abs(int8 / exact - 1) < 0.01, (exact, int8)
