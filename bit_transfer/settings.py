"""What bit-transfer is and what it reads from its environment: the version, the cache home, and the
one place the BIT_TRANSFER_* switches are read (docs/performance.md says what each one changes)."""

from __future__ import annotations

import os
from pathlib import Path

VERSION = "0.1.0"
DEFAULT_HOME = "~/.cache/bit-transfer"
LAUNCHER_PID = "BIT_TRANSFER_LAUNCHER_PID"  # set by `fit --devices` for the workers it starts
LOCAL_RANKS = "BIT_TRANSFER_LOCAL_RANKS"  # set by `fit --devices N`: N ranks share this machine


def home() -> Path:
    """$BIT_TRANSFER_HOME, else ~/.cache/bit-transfer (subfolders: weights, hf, data-cache, features, kernels,
    compile-cache)."""
    return Path(os.environ.get("BIT_TRANSFER_HOME") or DEFAULT_HOME).expanduser()


def _on(name: str) -> bool:
    return os.environ.get(f"BIT_TRANSFER_{name}", "1") != "0"


def cpu_kernels() -> bool:
    """Our compiled CPU kernels may be used (BIT_TRANSFER_CPU_KERNELS=0: MindSpore's own ops, NCHW, the
    graph Ascend and GPU compile)."""
    return _on("CPU_KERNELS")


def onednn() -> bool:
    """oneDNN's convolutions may be used (BIT_TRANSFER_ONEDNN=0: our other kernels only)."""
    return _on("ONEDNN")


def compile_cache() -> bool:
    """Compiled graphs are cached across runs (BIT_TRANSFER_COMPILE_CACHE=0 turns that off)."""
    return _on("COMPILE_CACHE")


def layout() -> str:
    """BIT_TRANSFER_LAYOUT: the activation layout asked for (nchw, nhwc, nchw8c), "" for the fastest."""
    return os.environ.get("BIT_TRANSFER_LAYOUT", "")


def progress_bar() -> bool:
    """BIT_TRANSFER_BAR=1: draw progress bars even when stderr is not a terminal."""
    return os.environ.get("BIT_TRANSFER_BAR") == "1"


def launcher_pid() -> int:
    """The pid of the `fit --devices` process that started this worker, 0 if none."""
    return int(os.environ.get(LAUNCHER_PID, "0") or 0)


def local_ranks() -> int:
    """How many ranks `fit --devices` started on this machine, 0 if it did not start this process."""
    return int(os.environ.get(LOCAL_RANKS, "0") or 0)
