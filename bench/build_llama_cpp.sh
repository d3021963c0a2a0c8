#!/usr/bin/env bash
# Builds llama.cpp's Python binding from source into .venv, for benchmarks only (never needed by
# the tests); takes ~6 minutes on 2 cores.
# Flags: this CPU's own (GGML_NATIVE), except on CPUs with AMX: llama.cpp 0.3.36 then also
# compiles its AMX path, which crashes (SIGSEGV) on any batch of more than one token on the
# Sapphire Rapids VMs we use, so there the x86 SIMD levels are named one by one without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if grep -qw amx_int8 /proc/cpuinfo; then
  flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
         -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
         -DGGML_AVX512_BF16=ON)
else
  flags=(-DGGML_NATIVE=ON)
fi
CMAKE_ARGS="${flags[*]}" nice -n 10 .venv/bin/pip install --force-reinstall --no-deps --no-cache-dir \
  --no-binary llama-cpp-python llama-cpp-python==0.3.36
# What --no-deps left out: the binding's own needs and its OpenAI server's (bench/bench_serve.py).
.venv/bin/pip install -q diskcache sse-starlette starlette-context pydantic-settings
