"""Helpers the tests share (and the benchmarks reuse): tiny models, reference computations,
test cases, and a server launcher. Nothing here ships with the package."""

from __future__ import annotations

import os
from pathlib import Path


def _find_fixtures() -> Path:
    """The project's shared fixtures (real vocabulary GGUFs): $LLAMAHERD_FIXTURES, else the
    `shared/fixtures` folder beside the checkout (or beside any folder above it)."""
    if os.environ.get("LLAMAHERD_FIXTURES"):
        return Path(os.environ["LLAMAHERD_FIXTURES"])
    for parent in Path(__file__).resolve().parents[2:]:
        if (parent / "shared" / "fixtures").is_dir():
            return parent / "shared" / "fixtures"
    return Path(__file__).resolve().parents[3] / "shared" / "fixtures"


FIXTURES = _find_fixtures()
