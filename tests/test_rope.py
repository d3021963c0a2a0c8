"""Rotary frequencies and Llama 3.1 long-context scaling vs SPECS.md section 2 and transformers."""

from __future__ import annotations

import math

import pytest
import torch

from llamaherd.config import PRESETS, RopeScaling
from llamaherd.model import StepContext, apply_rope, rope_frequencies


def spec_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> list[float]:
    """SPECS.md section 2 written out one frequency at a time, in float64."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        if scaling is None:
            out.append(f)
            continue
        w = 2 * math.pi / f
        low_wl = scaling.original_context / scaling.low_freq_factor
        high_wl = scaling.original_context / scaling.high_freq_factor
        if w < high_wl:
            out.append(f)
        elif w > low_wl:
            out.append(f / scaling.factor)
        else:
            s = (scaling.original_context / w - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            out.append((1 - s) * f / scaling.factor + s * f)
    return out


def _branches(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[int, int, int]:
    """How many frequencies are kept, divided, and blended."""
    wl = [2 * math.pi * theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    high = scaling.original_context / scaling.high_freq_factor
    low = scaling.original_context / scaling.low_freq_factor
    kept = sum(w < high for w in wl)
    divided = sum(w > low for w in wl)
    return kept, divided, len(wl) - kept - divided


@pytest.mark.parametrize("preset", ["llama2-7b", "llama3.1-8b", "llama3.2-1b", "smollm2-135m"])
def test_frequencies_match_the_spec_formula(preset: str) -> None:
    a = PRESETS[preset]
    ours = rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)
    ref = torch.tensor(spec_frequencies(a.head_dim, a.rope_theta, a.rope_scaling),
                       dtype=torch.float64)
    assert ours.dtype == torch.float32 and ours.shape == (a.head_dim // 2,)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_scaling_exercises_every_branch(factor: float) -> None:
    scaling = RopeScaling(factor=factor)
    kept, divided, blended = _branches(128, 500000.0, scaling)
    assert kept > 0 and divided > 0 and blended > 0
    ours = rope_frequencies(128, 500000.0, scaling)
    plain = rope_frequencies(128, 500000.0, None)
    assert torch.equal(ours[:kept], plain[:kept])  # high frequencies untouched
    torch.testing.assert_close(ours[-divided:], plain[-divided:] / factor)
    middle = ours[kept:kept + blended] / plain[kept:kept + blended]
    assert ((middle > 1 / factor) & (middle < 1)).all()


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_scaling_equals_transformers(factor: float) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert attention_factor == 1.0
    assert torch.equal(rope_frequencies(128, 500000.0, RopeScaling(factor=factor)), theirs)


def test_rotation_acts_on_adjacent_pairs() -> None:
    """Dimension pair i = (2i, 2i+1) of a head turns by position * frequency[i]."""
    head_dim, pos = 8, 5
    freqs = rope_frequencies(head_dim, 10000.0, None)
    ctx = StepContext.make(torch.tensor([[pos]]), None, freqs)
    for i in range(head_dim // 2):
        x = torch.zeros(1, 1, 1, head_dim)
        x[..., 2 * i] = 1.0
        y = apply_rope(x, ctx.rot)[0, 0, 0]
        angle = pos * freqs[i].item()
        expected = torch.zeros(head_dim)
        expected[2 * i], expected[2 * i + 1] = math.cos(angle), math.sin(angle)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
