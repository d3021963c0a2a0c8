"""ModelArgs: the few numbers that tell one Llama-family model from another, and where to read them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling for long context (SPECS.md section 2)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    head_dim: int | None = None  # defaults to dim // n_heads

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Every weight, embeddings and norms included; a tied output projection counted once."""
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim
        return emb * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + self.dim

    # ----- constructors from checkpoint metadata -----

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], vocab_size: int | None = None) -> ModelArgs:
        """From GGUF key/values (`general.architecture` must be llama)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"unsupported architecture {arch!r} (only 'llama' is supported)")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"llama.{key}", default)

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        vocab = get("vocab_size") or vocab_size
        if vocab is None:
            vocab = len(meta.get("tokenizer.ggml.tokens", []))
        scaling = None
        if get("rope.scaling.type") == "llama3":  # some converters record it as metadata
            scaling = RopeScaling(
                factor=float(get("rope.scaling.factor", 8.0)),
                original_context=int(get("rope.scaling.original_context_length", 8192)),
            )
        return cls(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 4096)),
            tie_embeddings=False,  # decided by the loader: true when there is no `output` tensor
            rope_scaling=scaling,
            head_dim=int(get("attention.key_length", dim // n_heads)),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """From a Hugging Face `config.json` of a LlamaForCausalLM."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(f"unsupported model_type {cfg.get('model_type')!r} (need llama)")
        scaling = None
        rs = cfg.get("rope_scaling") or {}
        if rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_context=int(rs.get("original_max_position_embeddings", 8192)),
            )
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        theta = cfg.get("rope_theta")
        if theta is None:  # newer transformers keep it under rope_parameters
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
        )

    @classmethod
    def from_params_json(cls, params: dict[str, Any], vocab_size: int | None = None) -> ModelArgs:
        """From a Meta `params.json` (vocab_size may be -1 there; then it comes from the weights)."""
        dim = int(params["dim"])
        n_heads = int(params["n_heads"])
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size and none was given")
            vocab = vocab_size
        scaling = RopeScaling() if params.get("use_scaled_rope") else None
        if scaling is not None and "rope_scaling_factor" in params:
            scaling = RopeScaling(factor=float(params["rope_scaling_factor"]))
        return cls(
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=vocab,
            hidden_dim=ffn_hidden_dim(dim, int(params.get("multiple_of", 256)),
                                      params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            # Meta's Llama 3.1+ params.json carries no context length: scaled rope means 128K
            max_seq_len=int(params.get("max_seq_len", 131072 if scaling else 4096)),
            tie_embeddings=bool(params.get("tie_embeddings", False)),
            rope_scaling=scaling,
        )

    def to_hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            cfg["rope_scaling"] = {
                "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_context,
            }
        return cfg

    def to_params_json(self) -> dict[str, Any]:
        """Meta params.json; the FFN size is written so that from_params_json recovers it exactly."""
        params: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "multiple_of": 1, "ffn_dim_multiplier": None, "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_seq_len": self.max_seq_len,
            "use_scaled_rope": self.rope_scaling is not None,
            "tie_embeddings": self.tie_embeddings,
        }
        if self.rope_scaling is not None:
            params["rope_scaling_factor"] = self.rope_scaling.factor
        # multiple_of=1 with the exact ratio reproduces hidden_dim after int() truncation.
        base = int(2 * 4 * self.dim / 3)
        if base != self.hidden_dim:
            params["ffn_dim_multiplier"] = (self.hidden_dim + 0.5) / base
        return params


def ffn_hidden_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """SwiGLU inner size as Meta computes it: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    h = int(2 * 4 * dim / 3)
    if multiplier is not None:
        h = int(multiplier * h)
    return multiple_of * math.ceil(h / multiple_of)


def _preset(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, multiple_of: int,
            multiplier: float | None, vocab: int, theta: float, context: int, tied: bool = False,
            scaling: RopeScaling | None = None) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=vocab, hidden_dim=ffn_hidden_dim(dim, multiple_of, multiplier),
                     rope_theta=theta, max_seq_len=context, tie_embeddings=tied,
                     rope_scaling=scaling)


_L31 = RopeScaling(factor=8.0)
_L32 = RopeScaling(factor=32.0)  # Hugging Face configs and torchtune; Meta's code hard-codes 8

PRESETS: dict[str, ModelArgs] = {
    "llama2-7b": _preset(4096, 32, 32, 32, 256, None, 32000, 10000.0, 4096),
    "llama2-13b": _preset(5120, 40, 40, 40, 256, None, 32000, 10000.0, 4096),
    "llama2-70b": _preset(8192, 80, 64, 8, 4096, 1.3, 32000, 10000.0, 4096),
    "llama3.1-8b": _preset(4096, 32, 32, 8, 1024, 1.3, 128256, 500000.0, 131072, scaling=_L31),
    "llama3.1-70b": _preset(8192, 80, 64, 8, 4096, 1.3, 128256, 500000.0, 131072, scaling=_L31),
    "llama3.1-405b": _preset(16384, 126, 128, 8, 4096, 1.2, 128256, 500000.0, 131072,
                             scaling=_L31),
    "llama3.2-1b": _preset(2048, 16, 32, 8, 256, 1.5, 128256, 500000.0, 131072, tied=True,
                           scaling=_L32),
    "llama3.2-3b": _preset(3072, 28, 24, 8, 256, 1.0, 128256, 500000.0, 131072, tied=True,
                           scaling=_L32),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                              tie_embeddings=True),
}
