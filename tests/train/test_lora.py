"""LoRA: starts at the base model, computes what peft's LoRA computes on the same weights, merges
exactly, and turns off for a reference model."""

from __future__ import annotations

import pytest
import torch

from llamaherd.train.lora import (
    ALL_LINEAR,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    merge_lora,
    merged_state_dict,
)
from tests.support.models import TINY, make_tiny_model

TOKENS = torch.tensor([[3, 17, 42, 9, 100, 7]])


def randomize_adapters(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_a_new_adapter_leaves_the_model_unchanged_and_only_it_trains() -> None:
    model = make_tiny_model(TINY)
    before = model(TOKENS)
    swapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(swapped) == TINY.n_layers * len(ALL_LINEAR)
    torch.testing.assert_close(model(TOKENS), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert len(adapter_state_dict(model)) == 2 * len(swapped)


def test_lora_matches_peft_on_the_same_weights() -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        pytest.fail("peft is a test dependency: .venv/bin/pip install -e '.[test]'")

    ours = make_tiny_model(TINY)
    apply_lora(ours, LoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "w2")))
    randomize_adapters(ours)
    theirs = get_peft_model(make_tiny_model(TINY), LoraConfig(
        r=4, lora_alpha=8, target_modules=["wq", "wv", "w2"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                mine = name.removeprefix("base_model.model.").replace(".lora_A.default", ".lora_a") \
                    .replace(".lora_B.default", ".lora_b").replace(".base_layer", "")
                p.copy_(dict(ours.named_parameters())[mine])
    torch.testing.assert_close(ours(TOKENS), theirs(TOKENS), atol=1e-5, rtol=1e-5)


def test_merging_gives_the_same_model_as_modules_and_as_a_state_dict() -> None:
    model = make_tiny_model(TINY)
    config = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, config)
    randomize_adapters(model)
    adapted = model(TOKENS)
    state = merged_state_dict(model.state_dict(), config.alpha / config.rank)
    with adapters_disabled(model):
        base = model(TOKENS)
    assert (adapted - base).abs().max() > 1e-3  # the adapters matter
    assert merge_lora(model) == TINY.n_layers * len(ALL_LINEAR)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(TOKENS), adapted, atol=1e-5, rtol=1e-5)
    plain = make_tiny_model(TINY, seed=5)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(TOKENS), adapted, atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(targets=("q_proj",))
