"""The default model's vocabulary and chat template equal transformers' reading of the same GGUF."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llamaherd import hub
from llamaherd.chat import chat_format
from llamaherd.tokenizer import Tokenizer, load

CORPUS: list[str] = json.loads(
    (Path(__file__).parent / "data" / "tokenizer_corpus.json").read_text(encoding="utf-8"))["strings"]


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return hub.pull("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="module")
def tok(smollm_path: Path) -> Tokenizer:
    return load(smollm_path)


@pytest.fixture(scope="module")
def hf_smollm(smollm_path: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise RuntimeError("these tests need transformers: pip install -e '.[test]'") from e
    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


# transformers' GGUF conversion of "smollm" leaves out SmolLM's digit split, which llama.cpp's
# "smollm" pre-tokenizer (and SmolLM's own tokenizer.json) applies first: the two differ only
# where a run of whitespace precedes a digit.
SPACES_BEFORE_DIGIT = re.compile(r"\s{2,}\d")


def test_encode_matches_transformers(tok: Tokenizer, hf_smollm) -> None:
    plain = [s for s in CORPUS if not SPACES_BEFORE_DIGIT.search(s)]
    assert len(plain) > 200
    bad = [s for s in plain
           if tok.encode(s) != hf_smollm.encode(s, add_special_tokens=False, split_special_tokens=True)
           or tok.encode(s, allow_special=True) != hf_smollm.encode(s, add_special_tokens=False)]
    assert not bad, bad[:5]


def test_decode_round_trips_where_transformers_does(tok: Tokenizer, hf_smollm) -> None:
    bad = [s for s in CORPUS
           if hf_smollm.decode(hf_smollm.encode(s, add_special_tokens=False)) == s
           and tok.decode(tok.encode(s)) != s]
    assert not bad, bad[:5]
    ids = hf_smollm.encode("Hello <|im_end|> world 😀", add_special_tokens=False)
    assert tok.decode(ids) == hf_smollm.decode(ids)


def test_digits_split_like_llama_cpp(tok: Tokenizer, hf_smollm) -> None:
    one = tok.token_to_id("1")
    assert tok.encode("  1") == [tok.token_to_id("ĠĠ"), one]  # "  " then "1", as in llama.cpp
    assert hf_smollm.encode("  1", add_special_tokens=False) == [tok.token_to_id("Ġ")] * 2 + [one]
    # With the digit split added in front, transformers agrees on those strings too.
    from tokenizers import pre_tokenizers

    backend = hf_smollm.backend_tokenizer
    original = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), original])
    try:
        affected = [s for s in CORPUS if SPACES_BEFORE_DIGIT.search(s)]
        bad = [s for s in affected if tok.encode(s) != backend.encode(s, add_special_tokens=False).ids]
    finally:
        backend.pre_tokenizer = original
    assert affected and not bad


DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "  And 3+3?\n\n"}],
    [{"role": "user", "content": "Grüße 😀 日本語\tTiếng Việt"}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids_match_transformers(tok: Tokenizer, hf_smollm, dialog: list,
                                              add_generation_prompt: bool) -> None:
    ours = chat_format(tok).encode_dialog(dialog, add_generation_prompt=add_generation_prompt)
    ref = hf_smollm.apply_chat_template(dialog, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    ref = ref if isinstance(ref, list) else ref["input_ids"]
    assert ours == ref


def test_chat_template_differs_only_by_protecting_user_text(tok: Tokenizer, hf_smollm) -> None:
    dialog = [{"role": "user", "content": "a<|im_end|>b"}]
    ours = chat_format(tok).encode_dialog(dialog)
    ref = hf_smollm.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True)
    ref = ref if isinstance(ref, list) else ref["input_ids"]
    assert ours.count(2) == ref.count(2) - 1  # transformers turns the user's text into <|im_end|>
    assert tok.decode(ours) == hf_smollm.decode(ref)
