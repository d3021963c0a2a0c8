"""Converting a model between GGUF and Hugging Face directories keeps its vocabulary: tokenizer
files written from a GGUF's metadata, GGUF metadata written from tokenizer files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llamaherd
from llamaherd import tokenizer as tok
from llamaherd.checkpoint.gguf import read_gguf
from llamaherd.convert import convert

TEXTS = ["Hello world", "The year 2024 had 366 days.", "ünïcode ✓ and\ttabs\n\nnewlines",
         "<|im_start|> typed by a user"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def same_vocabulary(a: tok.Tokenizer, b: tok.Tokenizer) -> None:
    assert a.vocab_size == b.vocab_size and a.special_tokens == b.special_tokens
    assert (a.bos_id, a.eos_id, a.add_bos, a.stop_ids) == (b.bos_id, b.eos_id, b.add_bos,
                                                           b.stop_ids)
    assert a.chat_template == b.chat_template
    for text in TEXTS:
        assert a.encode_prompt(text) == b.encode_prompt(text), text
        assert a.encode(text, allow_special=True) == b.encode(text, allow_special=True), text
    assert [a.id_to_piece(i) for i in range(0, a.vocab_size, 97)] == \
        [b.id_to_piece(i) for i in range(0, b.vocab_size, 97)]


@pytest.fixture(scope="module")
def default_hf(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    return convert(default_model_path, tmp_path_factory.mktemp("conv") / "hf", "hf")


def test_a_gguf_written_as_hf_keeps_its_tokenizer(default_hf: Path,
                                                  default_model_path: Path) -> None:
    assert (default_hf / "tokenizer.json").is_file()
    assert (default_hf / "tokenizer_config.json").is_file()
    original = tok.load(default_model_path)
    same_vocabulary(tok.load(default_hf), original)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(default_hf))
    for text in TEXTS[:3]:
        assert hf.encode(text, add_special_tokens=True) == original.encode_prompt(text)
    ours = llamaherd.load(default_hf, dtype="float32").chat_format.render(DIALOG)
    assert hf.apply_chat_template(DIALOG, tokenize=False, add_generation_prompt=True) == ours


def test_an_hf_directory_written_as_gguf_runs_packed_with_its_vocabulary(
        default_hf: Path, default_model_path: Path, tmp_path: Path) -> None:
    out = convert(default_hf, tmp_path / "back.gguf", "gguf", gguf_type="Q8_0")
    same_vocabulary(tok.load(out), tok.load(default_model_path))
    meta = read_gguf(out).metadata
    original = read_gguf(default_model_path).metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert list(meta[key]) == list(original[key]) if isinstance(meta[key], list) \
            else meta[key] == original[key], key
    llm = llamaherd.load(out)  # packed Q8_0 on the kernels
    assert llm.runner.decoder is not None
    ref = llamaherd.load(default_model_path, dtype="float32")
    ids = ref.tokenizer.encode("The capital of France is")
    cos = torch.nn.functional.cosine_similarity(llm.logits(ids)[-1], ref.logits(ids)[-1], dim=0)
    assert cos > 0.99


def test_a_sentencepiece_vocabulary_travels_both_ways(tiny_gguf_with_vocab: Path,
                                                      tmp_path: Path) -> None:
    hf = convert(tiny_gguf_with_vocab, tmp_path / "hf", "hf")
    assert (hf / "tokenizer.model").is_file()
    original = tok.load(tiny_gguf_with_vocab)
    same_vocabulary(tok.load(hf), original)
    back = convert(hf, tmp_path / "back.gguf", "gguf")
    same_vocabulary(tok.load(back), original)


def test_a_source_without_vocabulary_gives_an_output_without_one(tiny_gguf: Path,
                                                                 tmp_path: Path) -> None:
    hf = convert(tiny_gguf, tmp_path / "hf", "hf")
    assert not (hf / "tokenizer.json").exists() and not (hf / "tokenizer.model").exists()
    back = convert(hf, tmp_path / "back.gguf", "gguf")
    assert "tokenizer.ggml.tokens" not in read_gguf(back).metadata
