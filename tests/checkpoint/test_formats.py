"""GGUF, Hugging Face and Meta checkpoints: written, read and converted, the model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llamaherd.checkpoint import load_checkpoint
from llamaherd.checkpoint.gguf import read_gguf
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.checkpoint.hf import save_hf
from llamaherd.checkpoint.info import describe
from llamaherd.checkpoint.meta import save_meta
from llamaherd.config import ModelArgs
from llamaherd.convert import convert
from llamaherd.model import Transformer
from tests.support.models import TINY, TINY_LLAMA3, make_tiny_model

IDS = torch.tensor([[1, 17, 200, 3, 99, 42, 255, 0, 128, 64, 7, 7, 7, 31]])

CONFIGS = {
    "gqa": TINY,
    "tied": TINY.replace(tie_embeddings=True),
    "mha": TINY.replace(n_kv_heads=4),
    "llama3-scaling": TINY_LLAMA3,
}


def logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def same_args(a: ModelArgs, b: ModelArgs) -> bool:
    """Equal apart from norm_eps, which GGUF stores as float32."""
    return a.replace(norm_eps=b.norm_eps) == b and a.norm_eps == pytest.approx(b.norm_eps)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_gguf_hf_meta_gguf_is_exact(tmp_path: Path, name: str) -> None:
    args = CONFIGS[name]
    model = make_tiny_model(args)
    expected = logits(model)
    path: Path = write_gguf(model, tmp_path / "start.gguf")
    for fmt, dst in [("hf", "hf"), ("meta", "meta"), ("gguf", "end.gguf")]:
        path = convert(path, tmp_path / dst, fmt)
        ckpt = load_checkpoint(path, dtype=torch.float32)
        assert ckpt.format == fmt
        assert same_args(ckpt.args, args)
        assert torch.equal(logits(ckpt.model), expected), f"logits changed after {fmt}"
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value), key


def test_hf_directory_layout(tmp_path: Path) -> None:
    """Names from the key map, rotate-half rows, and no lm_head when tied."""
    model = make_tiny_model(CONFIGS["tied"])
    save_hf(model.state_dict(), model.args, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert len(tensors) == 2 + 9 * TINY.n_layers  # embeddings, final norm, 9 per layer
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2
    wq = model.layers[0].attention.wq.weight
    stored = tensors["model.layers.0.self_attn.q_proj.weight"]
    # head 0, rotate-half row j (j < head_dim/2) is Meta's interleaved row 2j
    assert torch.equal(stored[:8], wq[0:16:2]) and torch.equal(stored[8:16], wq[1:16:2])


def test_untied_model_keeps_a_separate_output(tmp_path: Path) -> None:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp_path)
    ckpt = load_checkpoint(tmp_path, dtype=torch.float32)
    assert not ckpt.args.tie_embeddings
    assert ckpt.model.output.weight.data_ptr() != ckpt.model.tok_embeddings.weight.data_ptr()


def test_tied_lm_head_copy_is_recognised(tmp_path: Path) -> None:
    """Some HF exports keep lm_head as an equal copy; the model is still tied."""
    model = make_tiny_model(CONFIGS["tied"])
    save_hf(model.state_dict(), model.args, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = load_checkpoint(tmp_path, dtype=torch.float32)
    assert ckpt.args.tie_embeddings
    assert ckpt.model.output.weight is ckpt.model.tok_embeddings.weight
    assert torch.equal(logits(ckpt.model), logits(model))


def test_sharded_hf_index_loads(tmp_path: Path) -> None:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = load_checkpoint(tmp_path, dtype=torch.float32)
    assert torch.equal(logits(ckpt.model), logits(model))


def test_bf16_hf_weights_convert_to_the_requested_dtype(tmp_path: Path) -> None:
    model = make_tiny_model(TINY)
    save_hf({k: v.bfloat16() for k, v in model.state_dict().items()}, model.args, tmp_path)
    ckpt = load_checkpoint(tmp_path, dtype=None)
    assert ckpt.tensor_types == {"BF16": 21}
    assert ckpt.model.layers[0].attention.wq.weight.dtype == torch.float32
    assert torch.equal(ckpt.model.layers[0].attention.wq.weight,
                       model.layers[0].attention.wq.weight.bfloat16().float())
    half = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert half.model.norm.weight.dtype == torch.bfloat16


def _split_like_meta(state: dict[str, torch.Tensor], n: int,
                     embedding_dim: int) -> list[dict[str, torch.Tensor]]:
    """Cut a state dict into n model-parallel shards the way Meta's reference code lays them out."""
    rows = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in state.items():
        if name.endswith(rows):
            parts = t.chunk(n, dim=0)
        elif name.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(n, dim=1)
        elif name == "tok_embeddings.weight":
            parts = t.chunk(n, dim=embedding_dim)
        else:  # norms are replicated
            parts = (t,) * n
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


@pytest.mark.parametrize("embedding_dim", [1, 0], ids=["llama2-embedding", "llama3-embedding"])
def test_meta_model_parallel_shards_merge(tmp_path: Path, embedding_dim: int) -> None:
    model = make_tiny_model(TINY)
    save_meta(model.state_dict(), model.args, tmp_path / "one")
    whole = load_checkpoint(tmp_path / "one", dtype=torch.float32)
    two = tmp_path / "two"
    two.mkdir()
    params = json.loads((tmp_path / "one" / "params.json").read_text())
    params["vocab_size"] = -1  # as in Meta's Llama 2 params.json: the weights decide
    (two / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(_split_like_meta(model.state_dict(), 2, embedding_dim)):
        shard["rope.freqs"] = torch.zeros(8)  # present in Meta's Llama 2 files, not a parameter
        torch.save(shard, two / f"consolidated.{i:02d}.pth")
    merged = load_checkpoint(two, dtype=torch.float32)
    assert merged.args == whole.args
    assert torch.equal(logits(merged.model), logits(whole.model))
    assert torch.equal(logits(merged.model), logits(model))


@pytest.mark.parametrize("gguf_type,tolerance", [("F16", 2e-3), ("Q8_0", 2e-2)])
def test_f16_and_q8_0_gguf_close_to_float32(tmp_path: Path, gguf_type: str,
                                            tolerance: float) -> None:
    model = make_tiny_model(TINY)
    src = write_gguf(model, tmp_path / "f32.gguf")
    out = convert(src, tmp_path / f"{gguf_type}.gguf", "gguf", gguf_type=gguf_type)
    ckpt = load_checkpoint(out, dtype=torch.float32)
    # weight matrices (7 per layer, embeddings, output) take the type; the 5 norms stay F32
    assert ckpt.tensor_types == {gguf_type: 7 * TINY.n_layers + 2, "F32": 2 * TINY.n_layers + 1}
    expected = logits(model)
    err = (logits(ckpt.model) - expected).abs().max().item()
    assert 0 < err < tolerance * expected.abs().max().item()


def test_gguf_written_is_read_by_the_gguf_package(tmp_path: Path) -> None:
    """An independent reader (llama.cpp's gguf-py) sees the llama keys with llama.cpp's types."""
    model = make_tiny_model(TINY_LLAMA3)
    path = write_gguf(model, tmp_path / "m.gguf", weight_type="Q8_0")
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    u32 = gguf.GGUFValueType.UINT32
    for key, value in [("llama.block_count", 2), ("llama.embedding_length", 64),
                       ("llama.feed_forward_length", 192), ("llama.attention.head_count", 4),
                       ("llama.attention.head_count_kv", 2), ("llama.context_length", 128),
                       ("llama.rope.dimension_count", 16), ("llama.vocab_size", 256)]:
        assert fields[key].types == [u32], key
        assert fields[key].contents() == value, key
    assert fields["llama.rope.freq_base"].contents() == 500000.0
    assert fields["general.architecture"].contents() == "llama"
    # llama.cpp rejects an unknown llama.rope.scaling.type: scaling travels as rope_freqs
    assert "llama.rope.scaling.type" not in fields
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    divisors = np.asarray(tensors["rope_freqs.weight"].data)
    assert divisors.shape == (8,) and divisors.max() == pytest.approx(8.0) and divisors.min() == 1


def test_gguf_to_gguf_keeps_vocabulary_and_chat_template(tmp_path: Path,
                                                         tiny_gguf_with_vocab: Path) -> None:
    src = read_gguf(tiny_gguf_with_vocab)
    out = read_gguf(convert(tiny_gguf_with_vocab, tmp_path / "q8.gguf", "gguf", gguf_type="Q8_0"))
    for key, value in src.metadata.items():
        if key.startswith("tokenizer."):
            assert out.value_types[key] == src.value_types[key], key
            assert np.array_equal(np.asarray(out.metadata[key]), np.asarray(value)), key
    assert out.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_real_model_gguf_rewrite_keeps_every_tokenizer_and_llama_key(tmp_path: Path,
                                                                     default_model_path) -> None:
    src = read_gguf(default_model_path)
    out = read_gguf(convert(default_model_path, tmp_path / "smol-f16.gguf", "gguf",
                            gguf_type="F16"))
    kept = [k for k in src.metadata if k.startswith(("tokenizer.", "llama."))]
    assert "tokenizer.chat_template" in kept and "tokenizer.ggml.merges" in kept
    for key in kept:
        assert out.value_types[key] == src.value_types[key], key
        assert np.array_equal(np.asarray(out.metadata[key]), np.asarray(src.metadata[key])), key
    assert set(out.tensors) == set(src.tensors)


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_safetensors_and_meta_weights_are_memory_mapped(tmp_path: Path) -> None:
    """Float32 weights that need no transform stay mapped from the file instead of copied."""
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp_path / "hf")
    save_meta(model.state_dict(), model.args, tmp_path / "meta")
    hf_file = str(tmp_path / "hf" / "model.safetensors")
    meta_file = str(tmp_path / "meta" / "consolidated.00.pth")
    assert hf_file not in _mapped_files() and meta_file not in _mapped_files()
    hf = load_checkpoint(tmp_path / "hf", dtype=torch.float32)
    assert hf_file in _mapped_files()
    meta = load_checkpoint(tmp_path / "meta", dtype=torch.float32)
    assert meta_file in _mapped_files()
    # a weight's storage lies inside the mapping of its file
    assert _inside_mapping(hf.model.layers[0].attention.wv.weight, hf_file)
    assert _inside_mapping(meta.model.layers[1].feed_forward.w2.weight, meta_file)


def _inside_mapping(t: torch.Tensor, file: str) -> bool:
    ptr = t.data_ptr()
    for line in _mapped_files().splitlines():
        if line.endswith(file):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_tokenizer_files_travel_between_hf_and_meta(tmp_path: Path) -> None:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp_path / "hf")
    files = {"tokenizer.json": '{"model": {"type": "BPE"}}',
             "tokenizer_config.json": '{"chat_template": "{{ messages }}"}',
             "tokenizer.model": "not really a tokenizer"}
    for name, text in files.items():
        (tmp_path / "hf" / name).write_text(text)
    meta = convert(tmp_path / "hf", tmp_path / "meta", "meta")
    back = convert(meta, tmp_path / "hf2", "hf")
    for name, text in files.items():
        assert (back / name).read_text() == text
    assert "chat template:  yes (14 characters)" in describe(back)
