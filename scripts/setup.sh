#!/usr/bin/env bash
# Creates .venv in the repository and installs llamaherd with its test dependencies.
# torch is pinned to 2.13.0, whose CPU build pip finds on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,bench]"
