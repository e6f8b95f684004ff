"""What the installed MindSpore needs of its neighbours, checked from the installed packages' metadata
before MindSpore is imported (the CLI's start-up).

Why: MindSpore 2.7-2.10 are built against NumPy 1 but their metadata allows NumPy 2, which pip then
picks; MindSpore's binary fails at import ("numpy.core.multiarray failed to import", then a
SystemError deep inside). pyproject.toml pins numpy<2, but an environment can still end up there
(`pip install -U numpy`, another package's requirement): one line says so instead.
"""

from __future__ import annotations

import os
import re
import sys

from bit_transfer.errors import UsageError

# MindSpore releases before this one are built against NumPy 1 (2.7.0-2.10.0 checked).
NUMPY2_FROM = (2, 11)


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int(re.match(r"\d*", p).group() or 0) for p in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def installed(name: str) -> str | None:
    """The version of the distribution `name` that imports would find (the first `name-V.dist-info` on
    sys.path), or None. A directory scan: importlib.metadata alone took ~90 ms to import here."""
    pattern = re.compile(rf"{name}-([^-]+)\.dist-info", re.IGNORECASE)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        found = next((m.group(1) for m in map(pattern.fullmatch, names) if m), None)
        if found:
            return found
    return None


def check_numpy() -> None:
    """UsageError (one line naming both versions and the fix) where the installed MindSpore cannot
    load the installed NumPy; nothing where either is missing (MindSpore's import says so)."""
    ms, np_ = installed("mindspore"), installed("numpy")
    if ms and np_ and _major_minor(np_)[0] >= 2 and _major_minor(ms) < NUMPY2_FROM:
        raise UsageError(f"NumPy {np_} is installed, but MindSpore {ms} is built against NumPy 1 and fails "
                         "to import with it; run: pip install 'numpy<2' 'pyarrow<26'")
