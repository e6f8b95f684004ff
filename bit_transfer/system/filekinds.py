"""What a path that is not a regular file is, in words: reading a FIFO blocks forever and a device
never ends, so such a path is named and refused (a recipe) or skipped (an image), never opened."""

from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path) -> str | None:
    """'a FIFO (named pipe)', 'a character device', ... for what is neither a regular file nor a
    directory (links followed); None for those, and for a path that does not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")
