"""Tiny guards for tests: a Llama Guard (a random tiny chat model trained in seconds on Llama
Guard 3 prompts to answer `unsafe\\nS9` when the judged message holds the trigger word, `safe`
otherwise) and a random Prompt Guard classifier."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llamaherd.safety import render
from llamaherd.safety.categories import LLAMA_GUARD_3_1B

TRIGGER = "bomb"
UNSAFE_ANSWER = "unsafe\nS9"
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "ate", "some", "fish", "while", "dog",
         "slept", "near", "old", "red", "door", "please", "tell", "me", "story", "about",
         "green", "hills", "rivers", "bread", "music", "friends", "weather", "how", "do", "I",
         "bake", "cake", "paint", "fence", "write", "poem", "learn", "math", "plant", "trees")


def sentence(rng: random.Random, trigger: bool) -> str:
    """A few random words, the trigger word among them when asked."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
    if trigger:
        words.insert(rng.randint(0, len(words)), TRIGGER)
    return " ".join(words)


def guard_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n SFT rows: the classification request of a user message (half of the rows) or of an
    answer to a harmless user message, and the verdict; every other row holds the trigger."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        unsafe = i % 2 == 0
        if (i // 2) % 2 == 0:
            conversation: list[dict[str, str]] = [
                {"role": "user", "content": sentence(rng, unsafe)}]
        else:
            conversation = [{"role": "user", "content": sentence(rng, False)},
                            {"role": "assistant", "content": sentence(rng, unsafe)}]
        request = render(conversation, LLAMA_GUARD_3_1B)
        rows.append({"messages": [{"role": "user", "content": request},
                                  {"role": "assistant",
                                   "content": UNSAFE_ANSWER if unsafe else "safe"}]})
    return rows


def train_tiny_guard(base: Path, out: Path, steps: int = 150) -> Path:
    """The tiny guard: `base` (a tiny chat model file) fine-tuned on guard_rows; its directory.
    One torch thread: on cores shared with other work, two threads each waiting on the other
    make the run ten times slower."""
    import torch

    import llamaherd.train

    out.mkdir(parents=True, exist_ok=True)
    data = out.parent / f"{out.name}-rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in guard_rows(256)))
    threads = torch.get_num_threads()
    try:
        return llamaherd.train.sft(model=str(base), data=str(data), out=str(out), steps=steps,
                                   lr=3e-3, batch_size=8, max_len=512, micro_tokens=4096,
                                   precision="float32", warmup_steps=5, val_fraction=0.05,
                                   threads=1, seed=0)
    finally:
        torch.set_num_threads(threads)  # the recipe sets the process's count


def write_tiny_prompt_guard(path: Path) -> Path:
    """A tiny random Prompt Guard: a Llama classifier with a 3-way score head (benign, injection,
    jailbreak) and the Llama 2 vocabulary, as a Hugging Face directory load_prompt_guard reads.
    Its head is scaled up so that its verdicts are confident: which texts it flags is arbitrary,
    but fixed (tests ask it first, then check that a server or command agrees)."""
    import torch

    from llamaherd.checkpoint.hf import save_hf
    from llamaherd.tokenizer import load as load_tokenizer
    from llamaherd.tokenizer.save import save_pretrained
    from llamaherd.train.reward_model import add_score_head
    from tests.support import FIXTURES
    from tests.support.models import TINY, make_tiny_model

    tokenizer = load_tokenizer(FIXTURES / "ggml-vocab-llama-spm.gguf")
    model = make_tiny_model(TINY.replace(vocab_size=32000))
    head = add_score_head(model, outputs=3, seed=1)
    with torch.no_grad():
        head.weight.mul_(20)
    path.mkdir(parents=True, exist_ok=True)
    save_hf(model.state_dict(), model.args, path)
    save_pretrained(tokenizer, path)
    return path

