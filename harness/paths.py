"""Where moebench keeps what it builds: zoo checkpoints, tokenizers, calibration caches."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root: $MOEBENCH_HOME, else ~/.cache/moebench."""
    root = os.environ.get("MOEBENCH_HOME") or os.path.join(Path.home(), ".cache", "moebench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """A named sub-folder of the cache root (``zoo``, ``calibration``, ``tokenizers``...)."""
    path = home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
