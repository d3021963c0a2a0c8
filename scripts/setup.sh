#!/usr/bin/env bash
# Sets up llamaherd in ./.venv on a fresh machine: Python packages (torch pinned to the CPU build
# 2.13.0), the C++ quantized kernels, and with --test the browser used by the web-page tests.
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
# Compile the GGUF kernels now (about 30 s) rather than on first use; without a C++ compiler
# llamaherd still runs, with slow pure-torch dequantization.
.venv/bin/python -m llamaherd.kernels \
  || echo "warning: GGUF C++ kernels failed to build; quantized models will run slowly" >&2

# The web-page tests drive Debian's chromium through Playwright (never Playwright's own browsers).
if [ "$with_tests" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q chromium
fi
