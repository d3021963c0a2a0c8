"""Builds, caches and loads the C++ GGUF kernels; says whether they are available.

The extension is compiled once per (source, compiler flags, torch, Python, CPU features) into
`<llamaherd cache>/ext/<hash>/` (~/.cache/llamaherd unless $LLAMAHERD_CACHE says otherwise), so
loading an already built one is a plain import. Set
`LLAMAHERD_NO_KERNELS=1` to force the pure-torch fallback, and `LLAMAHERD_KERNEL_ISA` to one of
ISA_FLAGS' names to build for another instruction set than this CPU's best (default "native"), e.g.
to test the AVX2 code on an AVX-512 machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from llamaherd.paths import cache_dir

NAME = "llamaherd_gguf_kernels"
SOURCE = Path(__file__).parent / "csrc" / "gguf_kernels.cpp"
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
ISA_FLAGS = {  # LLAMAHERD_KERNEL_ISA -> target flags; the C++ source picks its code path from them
    "native": ("-march=native",),
    "amx": ("-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8"),  # + AMX-INT8 tiles
    # + AMX-BF16 for matmuls of many rows (what -march=native gives on Sapphire Rapids)
    "amx_bf16": ("-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-mamx-bf16",
                 "-mavx512bf16"),
    "avx512": ("-march=x86-64-v4", "-mavx512vnni"),
    "avx_vnni": ("-march=x86-64-v3", "-mavxvnni"),
    "avx2": ("-march=x86-64-v3",),  # AVX2, FMA, F16C: Haswell, Zen and later
    "scalar": (),  # the compiler's default target: the portable C++ code
}
_X86_64_V3 = {"avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"}
_AVX512 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"}
ISA_CPU_FLAGS = {  # /proc/cpuinfo flags a CPU needs to run each fixed-ISA build
    "amx": _AVX512 | {"amx_tile", "amx_int8"},
    "amx_bf16": _AVX512 | {"amx_tile", "amx_int8", "amx_bf16", "avx512_bf16"},
    "avx512": _AVX512,
    "avx_vnni": _X86_64_V3 | {"avx_vnni"},
    "avx2": _X86_64_V3,
}

_module: ModuleType | None = None
_tried = False


def _cpu_features() -> str:
    """The CPU's feature flags, so a cache shared between machines never loads foreign code."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    """The instruction set to build for: $LLAMAHERD_KERNEL_ISA, checked against this CPU."""
    name = os.environ.get("LLAMAHERD_KERNEL_ISA", "native")
    if name not in ISA_FLAGS:
        raise ValueError(f"LLAMAHERD_KERNEL_ISA={name!r} is not one of {', '.join(ISA_FLAGS)}")
    missing = ISA_CPU_FLAGS.get(name, set()) - set(_cpu_features().split())
    if missing:
        raise ValueError(f"LLAMAHERD_KERNEL_ISA={name} needs CPU features this CPU lacks: "
                         f"{', '.join(sorted(missing))}")
    return name


def cflags() -> tuple[str, ...]:
    """Compiler flags for the selected instruction set."""
    return CFLAGS + ISA_FLAGS[isa()]


def build_dir() -> Path:
    """The cache directory for the extension built from the current source and flags here."""
    key = hashlib.sha256()
    sources = sorted(SOURCE.parent.iterdir())  # the module and the headers it includes
    flags = " ".join(cflags() + LDFLAGS).encode()
    for part in (*(f.read_bytes() for f in sources), flags, torch.__version__.encode(),
                 sys.version.encode(), _cpu_features().encode()):
        key.update(part)
    return cache_dir() / "ext" / key.hexdigest()[:16]


def _library(directory: Path) -> Path:
    return directory / f"{NAME}.so"


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False) -> None:
    """Compile the extension into its cache directory unless it is already there."""
    directory = build_dir()
    if _library(directory).exists():
        return
    from torch.utils.cpp_extension import load  # slow import, needed only to compile

    directory.mkdir(parents=True, exist_ok=True)
    load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(cflags()), extra_ldflags=list(LDFLAGS),
         build_directory=str(directory), verbose=verbose)


def loaded() -> ModuleType | None:
    """The kernels if load() has already made them available (never builds)."""
    return _module


def load() -> ModuleType | None:
    """The compiled kernels (building them first if needed), or None with a one-line warning."""
    global _module, _tried
    if _tried:
        return _module
    isa()  # a bad or unsupported $LLAMAHERD_KERNEL_ISA is an error, not a reason to fall back
    _tried = True
    if os.environ.get("LLAMAHERD_NO_KERNELS") == "1":
        reason = "LLAMAHERD_NO_KERNELS=1"
    else:
        try:
            build()
            _module = _import(_library(build_dir()))
            return _module
        except Exception as exc:  # noqa: BLE001 - any compiler or loader failure means: fall back
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
    warnings.warn(f"llamaherd: GGUF C++ kernels unavailable ({reason}); quantized layers fall back "
                  "to slow per-call dequantization in torch", RuntimeWarning, stacklevel=2)
    return None


def available() -> bool:
    """Whether the compiled kernels can be used in this process."""
    return load() is not None

