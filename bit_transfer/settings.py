"""Where bit-transfer keeps what it downloads and caches: one root for weights, data and features."""

from __future__ import annotations

import os
from pathlib import Path

VERSION = "0.1.0"
DEFAULT_HOME = "~/.cache/bit-transfer"


def home() -> Path:
    """$BIT_TRANSFER_HOME, else ~/.cache/bit-transfer (subfolders: weights, hf, data-cache, features, kernels,
    compile-cache)."""
    return Path(os.environ.get("BIT_TRANSFER_HOME") or DEFAULT_HOME).expanduser()
