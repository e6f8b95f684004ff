"""Other processes, by pid: is one still running, what /proc says of it (Linux; elsewhere less)."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Running: it exists and is not a zombie (an exited child its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    fields = stat_fields(pid)
    return not fields or fields[0] != "Z"


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; [] where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []
