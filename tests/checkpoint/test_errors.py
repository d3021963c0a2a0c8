"""Bad checkpoints give one-line errors naming the file and the problem, never run pickled code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llamaherd.checkpoint import CheckpointError, load_checkpoint
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.checkpoint.hf import save_hf
from llamaherd.checkpoint.info import describe
from llamaherd.checkpoint.meta import save_meta
from tests.support.models import TINY, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


class RunsCommand:
    """Pickles to a call of os.system: loading it unsafely would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Opaque:
    """A plain class instance, which weights-only unpickling must refuse too."""


# ----- each builder makes one kind of bad checkpoint and returns (path, words in the error) -----

def truncated_gguf(tmp: Path) -> tuple[Path, str]:
    path = write_gguf(make_tiny_model(TINY), tmp / "cut.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path, "truncated"


def truncated_gguf_header(tmp: Path) -> tuple[Path, str]:
    path = write_gguf(make_tiny_model(TINY), tmp / "cut-header.gguf")
    path.write_bytes(path.read_bytes()[:200])
    return path, "truncated"


def wrong_magic(tmp: Path) -> tuple[Path, str]:
    path = write_gguf(make_tiny_model(TINY), tmp / "magic.gguf")
    data = bytearray(path.read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(bytes(data))
    return path, "wrong magic number"


def not_gguf_at_all(tmp: Path) -> tuple[Path, str]:
    path = tmp / "notes.txt"
    path.write_text("just some text\n")
    return path, "not a GGUF file"


def unsupported_type(tmp: Path) -> tuple[Path, str]:
    path = tmp / "q2k.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K]
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, size), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q2_K)  # 4 rows of 256 weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, "unsupported tensor type Q2_K"


def unknown_type_code(tmp: Path) -> tuple[Path, str]:
    path = write_gguf(make_tiny_model(TINY), tmp / "code.gguf")
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path, "unknown tensor type 250"


def shape_disagrees(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    model.args = TINY.replace(hidden_dim=128)  # the header will claim a smaller FFN
    path = write_gguf(model, tmp / "shape.gguf")
    return path, "has shape (192, 64), the config expects (128, 64)"


def hf_shape_disagrees(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), TINY.replace(n_kv_heads=4), tmp / "hf")
    return tmp / "hf", "config expects 64 rows"


def hf_tied_but_different(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)  # untied: output differs from the embedding
    save_hf(model.state_dict(), TINY, tmp / "hf")
    config = json.loads((tmp / "hf" / "config.json").read_text())
    (tmp / "hf" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    return tmp / "hf", ("the config ties the embeddings but the output projection differs from "
                        "the token embedding")


def hf_missing_shard(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp / "hf")
    names = sorted(load_file(tmp / "hf" / "model.safetensors"))
    (tmp / "hf" / "model.safetensors").rename(tmp / "hf" / "model-00001-of-00002.safetensors")
    index = {"weight_map": {n: f"model-0000{1 + i % 2}-of-00002.safetensors"
                            for i, n in enumerate(names)}}
    (tmp / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp / "hf", "model-00002-of-00002.safetensors: missing shard"


def truncated_safetensors(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp / "hf")
    file = tmp / "hf" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    return tmp / "hf", "model.safetensors"


def meta_missing_shard(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_meta(model.state_dict(), model.args, tmp / "meta")
    for i in (1, 2):  # shard 02 exists, 01 does not
        torch.save(model.state_dict(), tmp / "meta" / f"consolidated.0{i}.pth")
    (tmp / "meta" / "consolidated.01.pth").unlink()
    return tmp / "meta", "consolidated.01.pth: missing shard (found shards 00, 02)"


def meta_truncated(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_meta(model.state_dict(), model.args, tmp / "meta")
    file = tmp / "meta" / "consolidated.00.pth"
    file.write_bytes(file.read_bytes()[:3000])
    return tmp / "meta", "not a readable PyTorch checkpoint"


def meta_with_code(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_meta(model.state_dict(), model.args, tmp / "meta")
    state = dict(model.state_dict(), extra=RunsCommand(tmp / "PWNED"))
    torch.save(state, tmp / "meta" / "consolidated.00.pth")
    return tmp / "meta", "refusing to unpickle"


def meta_with_object(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_meta(model.state_dict(), model.args, tmp / "meta")
    torch.save(dict(model.state_dict(), extra=Opaque()), tmp / "meta" / "consolidated.00.pth")
    return tmp / "meta", "refusing to unpickle"


def hf_pickle_bin(tmp: Path) -> tuple[Path, str]:
    model = make_tiny_model(TINY)
    save_hf(model.state_dict(), model.args, tmp / "hf")
    (tmp / "hf" / "model.safetensors").unlink()
    torch.save({"x": RunsCommand(tmp / "PWNED")}, tmp / "hf" / "pytorch_model.bin")
    return tmp / "hf", "refusing to unpickle"


def missing_path(tmp: Path) -> tuple[Path, str]:
    return tmp / "nowhere" / "model.gguf", "no such file or directory"


BAD = [truncated_gguf, truncated_gguf_header, wrong_magic, not_gguf_at_all, unsupported_type,
       unknown_type_code, shape_disagrees, hf_shape_disagrees, hf_tied_but_different,
       hf_missing_shard,
       truncated_safetensors, meta_missing_shard, meta_truncated, meta_with_code,
       meta_with_object, hf_pickle_bin, missing_path]


@pytest.mark.parametrize("make_bad", BAD, ids=lambda f: f.__name__)
def test_load_raises_one_line_checkpoint_error(tmp_path: Path, make_bad) -> None:
    path, words = make_bad(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, dtype=torch.float32)
    message = str(info.value)
    assert "\n" not in message
    assert words in message
    assert path.name in message or str(info.value.path).startswith(str(path))
    assert not (tmp_path / "PWNED").exists(), "pickled code ran"


@pytest.mark.parametrize("make_bad", [truncated_gguf, wrong_magic, unsupported_type,
                                      shape_disagrees, meta_with_code, hf_pickle_bin,
                                      missing_path], ids=lambda f: f.__name__)
def test_info_reports_the_same_problem_without_loading(tmp_path: Path, make_bad) -> None:
    path, words = make_bad(tmp_path)
    with pytest.raises((CheckpointError, FileNotFoundError)) as info:
        describe(path)
    assert "\n" not in str(info.value) and (words in str(info.value))
    assert not (tmp_path / "PWNED").exists(), "pickled code ran"


@pytest.mark.parametrize("make_bad", [truncated_gguf, unknown_type_code, meta_with_code,
                                      hf_pickle_bin, missing_path], ids=lambda f: f.__name__)
def test_cli_prints_one_error_line_and_exits_1(tmp_path: Path, make_bad) -> None:
    path, words = make_bad(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "llamaherd.cli", "info", str(path)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and words in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "PWNED").exists(), "pickled code ran"


def test_unsafe_pickle_would_run_code(tmp_path: Path) -> None:
    """The guard above means something: the same file loaded without weights_only runs it."""
    path, _ = meta_with_code(tmp_path)
    torch.load(path / "consolidated.00.pth", weights_only=False)
    assert (tmp_path / "PWNED").exists()
