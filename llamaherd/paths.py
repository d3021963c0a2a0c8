"""Where llamaherd keeps what it downloads and builds: one cache root for models and kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $LLAMAHERD_CACHE, else ~/.cache/llamaherd."""
    return Path(os.environ.get("LLAMAHERD_CACHE") or Path.home() / ".cache" / "llamaherd")
