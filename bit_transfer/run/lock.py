"""One writer per directory: an OS lock (`flock`) held by the process that writes there.

The kernel releases a `flock` when its holder dies, `kill -9` included, so no stale lock is ever
left to clean up. The lock is taken on a file that is never replaced (a run's marker, a feature
cache entry's lock file): a file written by rename would hand the next process another inode to
lock. A process that finds the lock taken learns who holds it from /proc/locks (Linux; elsewhere
"another process"). Locks are per process: a second hold of the same file in one process shares
the first, and the lock is released when the last `Lock` holding it is closed or collected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import weakref
from pathlib import Path

_HELD: dict[tuple[int, int], weakref.ref] = {}  # (device, inode) -> this process's Lock on it


class Held(Exception):
    """The lock is another process's; `pid` is that process (None when it cannot be told)."""

    def __init__(self, pid: int | None):
        super().__init__(pid)
        self.pid = pid

    @property
    def who(self) -> str:
        return f"pid {self.pid}" if self.pid else "another process"


class Lock:
    """An exclusive `flock` on one file, open for as long as this object is (or until `close`)."""

    def __init__(self, fd: int, key: tuple[int, int]):
        self.key = key
        self._closer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        _HELD.pop(self.key, None)
        self._closer()


def hold(path: Path) -> Lock | None:
    """Lock `path` (an existing file) for this process, or raise `Held`. None where the file system
    offers no locks (then nothing can be enforced, and writing goes on as before)."""
    fd = os.open(path, os.O_RDONLY)
    key = _key(fd)
    mine = _HELD.get(key)
    if mine and mine():
        os.close(fd)
        return mine()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise Held(holder(key)) from None
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return _register(fd, key)


def hold_when_free(path: Path) -> None:
    """Wait (in a thread) for `path`'s lock and keep it for the life of this process: rank 0 of
    `fit --devices` takes the run over from its launcher the moment the launcher dies."""
    fd = os.open(path, os.O_RDONLY)

    def wait():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return
        _KEPT.append(_register(fd, _key(fd)))

    threading.Thread(target=wait, name="run-lock", daemon=True).start()


_KEPT: list[Lock] = []  # locks taken over by `hold_when_free`, kept until exit


def _register(fd: int, key: tuple[int, int]) -> Lock:
    lock = Lock(fd, key)
    _HELD[key] = weakref.ref(lock)
    return lock


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def holder(key: tuple[int, int]) -> int | None:
    """The pid holding a `flock` on the file (device, inode), from /proc/locks; None if unknown."""
    dev, ino = key
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK":  # "->" lines are processes waiting for it
            continue
        try:
            major, minor, inode = f[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == (os.major(dev), os.minor(dev), ino):
                return int(f[4]) or None
        except ValueError:
            continue
    return None
