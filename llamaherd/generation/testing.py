"""Tiny random models and a greedy no-cache reference loop, for tests of anything built on generation."""

from __future__ import annotations

import torch

from llamaherd.config import ModelArgs
from llamaherd.generation.sampling import apply_penalties
from llamaherd.model import Transformer


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 256, dim: int = 64,
               n_layers: int = 2) -> Transformer:
    """A randomly initialised float32 Llama (2 layers, dim 64, GQA 4/2 heads) in eval mode."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                     hidden_dim=2 * dim, max_seq_len=max_seq_len, rope_theta=10000.0)
    model = Transformer(args).eval()
    with torch.no_grad():  # larger logits than the default init, so argmax is never a near-tie
        model.output.weight.mul_(4.0)
    return model


@torch.inference_mode()
def reference_greedy(model: Transformer, prompt: list[int], steps: int,
                     repetition: float = 1.0, presence: float = 0.0,
                     frequency: float = 0.0) -> list[int]:
    """Greedy decoding the slow, obvious way: the whole sequence through the model each step,
    no KV cache (any cache the model holds is set aside and restored)."""
    saved = [layer.attention.cache for layer in model.layers]
    model.drop_cache()
    try:
        ids, out = list(prompt), []
        V = model.args.vocab_size
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            seen = torch.zeros(V, dtype=torch.bool)
            seen[ids] = True
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V).float()
            logits = apply_penalties(logits, seen, counts, repetition, presence, frequency)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
        return out
    finally:
        for layer, cache in zip(model.layers, saved):
            layer.attention.cache = cache
