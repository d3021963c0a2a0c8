"""Tiny random models, and a greedy no-cache reference loop for tests of anything built on them."""

from __future__ import annotations

import torch

from llamaherd.config import ModelArgs, RopeScaling
from llamaherd.generation.sampling import apply_penalties
from llamaherd.model import Transformer

# dim 64, 2 layers, 4 heads of 16, 2 kv heads (GQA), vocab 256; rows fill Q8_0 blocks of 32.
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192,
                 rope_theta=10000.0, max_seq_len=128)
TINY_LLAMA3 = TINY.replace(rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0))


def make_tiny_model(args: ModelArgs = TINY, seed: int = 0, logit_scale: float = 1.0
                    ) -> Transformer:
    """A random float32 model in eval mode whose every weight matters (norm weights are not all
    ones). logit_scale multiplies the output projection: tests that compare generated token
    sequences take larger logits, so that no argmax is a near-tie."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name != "tok_embeddings.weight":
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
        if not args.tie_embeddings:
            model.output.weight.mul_(logit_scale)
    return model.eval()


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
