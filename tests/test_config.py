"""ModelArgs: presets reproduce the published parameter counts; every config format round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from llamaherd.checkpoint.gguf import read_gguf
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.config import PRESETS, ModelArgs, RopeScaling, ffn_hidden_dim
from llamaherd.model import Transformer

# SPECS.md section 1: (ffn hidden size, parameters) as published.
PUBLISHED = {
    "llama2-7b": (11008, 6_738_415_616),
    "llama2-13b": (13824, 13_015_864_320),
    "llama2-70b": (28672, 68_976_648_192),
    "llama3.1-8b": (14336, 8_030_261_248),
    "llama3.1-70b": (28672, 70_553_706_496),
    "llama3.1-405b": (53248, 405_853_388_800),
    "llama3.2-1b": (8192, 1_235_814_400),
    "llama3.2-3b": (8192, 3_212_749_824),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_parameter_count(name: str) -> None:
    args = PRESETS[name]
    hidden, params = PUBLISHED[name]
    assert args.hidden_dim == hidden
    assert args.num_parameters() == params
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(args)
    # parameters() yields a tied output projection once, as the published counts do
    assert sum(p.numel() for p in model.parameters()) == params


def test_smollm2_preset_matches_the_real_file(default_model_path) -> None:
    f = read_gguf(default_model_path)
    args = ModelArgs.from_gguf(f.metadata, vocab_size=f.tensors["token_embd.weight"].shape[0])
    args = args.replace(tie_embeddings="output.weight" not in f.tensors)
    preset = PRESETS["smollm2-135m"]
    assert args.replace(norm_eps=preset.norm_eps) == preset  # GGUF stores eps as float32
    assert args.norm_eps == pytest.approx(1e-5)
    assert preset.num_parameters() == sum(math.prod(t.shape) for t in f.tensors.values())


def test_ffn_hidden_dim_follows_meta_rounding() -> None:
    assert ffn_hidden_dim(4096, 256, None) == 11008  # int(2*4*4096/3)=10922 -> up to 256
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336
    assert ffn_hidden_dim(2048, 256, 1.5) == 8192


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name: str) -> None:
    args = PRESETS[name]
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_params_json_round_trip(name: str) -> None:
    args = PRESETS[name]
    assert ModelArgs.from_params_json(args.to_params_json()) == args


def test_from_params_json_reads_metas_published_files() -> None:
    # Llama 2 7B params.json: vocab_size -1 (the weights decide), default theta
    llama2 = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
              "vocab_size": -1}
    args = ModelArgs.from_params_json(llama2, vocab_size=32000)
    assert args == PRESETS["llama2-7b"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelArgs.from_params_json(llama2)
    # Llama 3.1 8B params.json (its context window is not in the file)
    llama31 = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
               "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
               "use_scaled_rope": True, "vocab_size": 128256}
    args = ModelArgs.from_params_json(llama31)
    assert args == PRESETS["llama3.1-8b"].replace(max_seq_len=args.max_seq_len)
    assert args.rope_scaling == RopeScaling(factor=8.0)


def test_from_hf_config_reads_a_published_llama32_config() -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
           "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
           "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
           "vocab_size": 128256, "torch_dtype": "bfloat16",
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert ModelArgs.from_hf_config(cfg) == PRESETS["llama3.2-1b"]


@pytest.mark.parametrize("args", [
    PRESETS["llama3.2-1b"].replace(n_layers=1, vocab_size=64, dim=64, n_heads=4, n_kv_heads=2,
                                   hidden_dim=128, head_dim=None),  # None: dim // n_heads
    ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32, hidden_dim=96,
              rope_theta=10000.0, max_seq_len=256, head_dim=32),  # head_dim != dim / n_heads
], ids=["llama3-scaling-tied", "wide-heads"])
def test_gguf_metadata_round_trip(tmp_path, args: ModelArgs) -> None:
    """What write_gguf records, ModelArgs.from_gguf (plus the loader's tensor checks) reads back."""
    from llamaherd.checkpoint import load_checkpoint

    path = write_gguf(Transformer(args), tmp_path / "m.gguf")  # random weights
    f = read_gguf(path)
    read = ModelArgs.from_gguf(f.metadata, vocab_size=f.tensors["token_embd.weight"].shape[0])
    assert read.replace(tie_embeddings=args.tie_embeddings, rope_scaling=args.rope_scaling,
                        norm_eps=args.norm_eps) == args
    # the scaling travels as llama.cpp's rope_freqs divisors; the loader recognises it
    assert load_checkpoint(path, dtype=torch.float32).args.replace(norm_eps=args.norm_eps) == args
