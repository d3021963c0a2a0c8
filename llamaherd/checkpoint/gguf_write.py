"""Writing a model as a llama GGUF file, with the `gguf` package maintained with llama.cpp."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

from llamaherd.checkpoint.gguf import GGUFFile
from llamaherd.checkpoint.keymaps import from_internal
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer, rope_frequencies

# GGUF type of the weight matrices -> (tensor type, file type); norms are always F32.
WEIGHT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# general.* keys that describe the file itself: the writer sets them, they are not copied.
_FILE_KEYS = {"general.architecture", "general.file_type", "general.quantization_version",
              "general.alignment"}


def write_gguf(model: Transformer, dst: str | Path, *, weight_type: str = "F32",
               source: GGUFFile | None = None,
               add_metadata: Callable[[GGUFWriter], None] | None = None) -> Path:
    """Write a float (not packed) model as a llama GGUF: every `llama.*` key that
    ModelArgs.from_gguf reads, weight matrices as `weight_type`, norms in F32, Llama 3.1 rotary
    scaling as the `rope_freqs` divisors llama.cpp applies, the `general.*` and `tokenizer.*`
    keys of `source`, and whatever `add_metadata(writer)` adds (a vocabulary, say)."""
    args: ModelArgs = model.args
    qtype, file_type = WEIGHT_TYPES[weight_type]
    dst = Path(dst)
    part = dst.with_name(dst.name + ".part")
    w = GGUFWriter(part, "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_file_type(file_type)
    if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        w.add_quantization_version(GGML_QUANT_VERSION)
    if source is not None:
        for key, value in source.metadata.items():
            copied = key.startswith(("tokenizer.", "general."))
            if copied and key not in _FILE_KEYS:
                vtype, etype = source.value_types[key]
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                w.add_key_value(key, value, vtype, sub_type=etype)
    if add_metadata is not None:
        add_metadata(w)

    for name, t in model.state_dict().items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        _add_tensor(w, from_internal(name, "gguf"), t.detach().float().cpu().numpy(), qtype)
    # llama.cpp has no "llama3" rope scaling type: it divides each frequency by rope_freqs.
    base = rope_frequencies(args.head_dim, args.rope_theta, None)
    freqs = model.rope_freqs.detach().float().cpu()
    if not torch.equal(freqs, base):
        w.add_tensor("rope_freqs.weight", (base / freqs).numpy())

    try:  # written beside the destination, renamed into place when complete
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dst)
    return dst


def _add_tensor(w: GGUFWriter, name: str, arr: np.ndarray, qtype: GGMLQuantizationType) -> None:
    """Vectors (norms) stay F32; matrices take `qtype` (F16 if a row does not fill Q8_0 blocks)."""
    if arr.ndim == 1 or qtype == GGMLQuantizationType.F32:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    elif qtype == GGMLQuantizationType.F16 or arr.shape[-1] % 32:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)
