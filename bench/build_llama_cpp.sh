#!/usr/bin/env bash
# Builds llama.cpp's Python binding from source (native CPU flags) into .venv, for benchmarks only.
# Takes ~6+ minutes on 2 cores; never needed by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE_ARGS="-DGGML_NATIVE=ON" nice -n 10 .venv/bin/pip install --no-binary llama-cpp-python \
  llama-cpp-python==0.3.36
