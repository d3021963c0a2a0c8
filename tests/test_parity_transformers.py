"""Same numbers as transformers: the real model from its GGUF; tiny models through HF files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamaherd.api import LLM, load
from llamaherd.checkpoint import load_checkpoint
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.checkpoint.hf import save_hf
from llamaherd.checkpoint.keymaps import hf_to_meta_rows, is_rotary
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer
from tests.support.models import TINY, TINY_LLAMA3, make_tiny_model

try:
    import transformers
except ImportError as e:  # a test dependency: say what to install rather than skip
    raise ImportError("these tests need transformers and accelerate: "
                      "pip install 'transformers==5.24.0' accelerate") from e

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les élèves ont lu 3 livres — ¿y tú? 🙂 " * 3,
    ("Once upon a time, in a small village by the sea, there lived an old fisherman who "
     "every morning rowed out before dawn. One day he caught a fish that spoke to him and said"),
]
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """transformers' decode loop is several times slower with two threads when the cores are
    shared (threads wait for each other); one thread keeps this module's run time steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reference(default_model_path: Path) -> tuple[object, object]:
    """transformers' tokenizer and float32 model, both read from the same GGUF (loaded once)."""
    kwargs = {"gguf_file": default_model_path.name}
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, dtype=torch.float32, **kwargs).eval()
    return tok, model


@pytest.fixture(scope="session")
def ours(default_model_path: Path) -> LLM:
    """The front door, exact float32 path."""
    return load("smollm2-135m-instruct", dtype="float32")


def _prompt_ids(tok, i: int) -> list[int]:
    if i == len(PROMPTS):
        return list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
    return tok(PROMPTS[i]).input_ids


@pytest.mark.parametrize("i", range(len(PROMPTS) + 1))
def test_real_model_logits_match_transformers(reference, ours: LLM, i: int) -> None:
    tok, hf = reference
    ids = _prompt_ids(tok, i)
    assert len(ids) >= 5
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = ours.logits(ids)
    if i < len(PROMPTS):  # both tokenizers read the same GGUF vocabulary
        assert ours.tokenizer.encode(PROMPTS[i]) == ids
    assert got.shape == expected.shape == (len(ids), 49152)
    assert (got - expected).abs().max().item() < 1e-3


def _greedy_with_cache(model: Transformer, ids: list[int], n: int,
                       banned: list[int]) -> list[int]:
    """Prefill, then decode one token at a time through the KV cache. `banned` tokens are never
    picked, as transformers' min_new_tokens does with end-of-sequence tokens."""
    model.setup_cache(1, len(ids) + n)
    try:
        logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
        out: list[int] = []
        while True:
            logits[banned] = float("-inf")
            out.append(int(logits.argmax()))
            if len(out) == n:
                return out
            pos = torch.tensor([len(ids) + len(out) - 1])
            logits = model(torch.tensor([[out[-1]]]), pos)[0, -1]
    finally:
        model.drop_cache()


def _banned(hf) -> list[int]:
    eos = hf.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def test_real_model_greedy_continuation_matches_transformers_generate(reference,
                                                                      ours: LLM) -> None:
    tok, hf = reference
    ids = _prompt_ids(tok, 0)
    banned = _banned(hf)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                               do_sample=False, max_new_tokens=64, min_new_tokens=64,
                               pad_token_id=banned[0])[0, len(ids):].tolist()
        got = _greedy_with_cache(ours.model, ids, 64, banned)
    assert len(expected) == 64
    assert got == expected, (tok.decode(got), tok.decode(expected))


def test_real_model_greedy_chat_reply_is_transformers_argmax(reference, ours: LLM) -> None:
    """The same check for a chat prompt, cheaper than a second generate(): one transformers
    forward pass over prompt + our 64 cached-decode tokens must pick each of them by argmax."""
    tok, hf = reference
    ids = _prompt_ids(tok, len(PROMPTS))
    banned = _banned(hf)
    with torch.no_grad():
        got = _greedy_with_cache(ours.model, ids, 64, banned)
        logits = hf(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
    logits[:, banned] = float("-inf")
    assert logits.argmax(-1).tolist() == got, tok.decode(got)
    assert len(set(got)) > 10  # a real reply, not one token repeated


# ----- tiny random models exported to HF files and loaded by transformers -----

LONG = TINY_LLAMA3.replace(max_seq_len=16384)
TINY_CASES = {"gqa": TINY, "mha": TINY.replace(n_kv_heads=4),
              "tied": TINY.replace(tie_embeddings=True), "llama3-scaling": LONG}
IDS = torch.tensor([[5, 200, 17, 3, 99, 42, 255, 0, 128, 64, 7, 7, 31, 180]])


def _positions(args: ModelArgs) -> torch.Tensor:
    """With long-context scaling, positions 1000 apart: rotary attention sees only relative
    positions, and these reach past the original 8192-token context where the scaling acts."""
    step = 1000 if args.rope_scaling is not None else 1
    return torch.arange(IDS.shape[1]) * step


def _ours(model: Transformer, args: ModelArgs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, _positions(args))[0]


def _theirs(directory: Path, args: ModelArgs, **kwargs) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                           **kwargs).eval()
    with torch.no_grad():
        return hf(IDS, position_ids=_positions(args)[None]).logits[0]


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_tiny_hf_export_matches_transformers(tmp_path: Path, name: str) -> None:
    args = TINY_CASES[name]
    model = make_tiny_model(args)
    save_hf(model.state_dict(), args, tmp_path)
    expected = _ours(model, args)
    torch.testing.assert_close(_theirs(tmp_path, args), expected, rtol=0, atol=1e-4)
    # and our own HF reader gives back exactly our model
    assert torch.equal(_ours(load_checkpoint(tmp_path, dtype=torch.float32).model, args),
                       expected)


def test_rope_scaling_case_is_sensitive_to_the_scaling() -> None:
    """The llama3-scaling case above proves something: without scaling the logits differ."""
    model = make_tiny_model(LONG)
    plain = make_tiny_model(LONG.replace(rope_scaling=None))
    assert (_ours(model, LONG) - _ours(plain, LONG)).abs().max() > 1e-2


def test_skipping_the_rotary_permutation_is_caught(tmp_path: Path) -> None:
    """Rows written in Meta's interleaved order (no permutation) load into transformers as a
    different model: the parity test above would fail for such a writer."""
    model = make_tiny_model(TINY)
    state = model.state_dict()
    for name, t in state.items():
        if is_rotary(name):  # undo the writer's permutation in advance
            heads = TINY.n_heads if "wq" in name else TINY.n_kv_heads
            state[name] = hf_to_meta_rows(t, heads)
    save_hf(state, TINY, tmp_path)
    assert (_theirs(tmp_path, TINY) - _ours(model, TINY)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_tiny_gguf_export_matches_transformers_gguf_reader(tmp_path: Path, name: str) -> None:
    """transformers reads our GGUF with llama.cpp's gguf-py and its own reverse permutation."""
    args = TINY_CASES[name]
    model = make_tiny_model(args)
    write_gguf(model, tmp_path / "tiny.gguf")
    theirs = _theirs(tmp_path, args, gguf_file="tiny.gguf")
    torch.testing.assert_close(theirs, _ours(model, args), rtol=0, atol=1e-4)
