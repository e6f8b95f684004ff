"""Atomic file writes, the one way every writer puts a file in place (run logs, checkpoints, exports,
caches, downloads, kernel libraries): readers and other processes see the old file or the new one,
never a part, and a power cut after the rename keeps the new one."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from bit_transfer.errors import storage_error
from bit_transfer.system import processes


def atomic_write(path, write, *, mode: int | None = 0o644, needed: int | None = None, suffix: str = "",
                 flag: str | None = None) -> Path:
    """`write(tmp)` fills a per-process temporary beside `path`, which is then published over `path`.
    Any failure (Ctrl-C too) removes the temporary; an OSError is one line naming the place (`needed`:
    the bytes it wanted, for a full disk; `flag`: the option that chooses another place). `suffix` ends the
    temporary's name (writers that insist on one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        publish(tmp, path, mode)
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, OSError):
            raise storage_error(e, path, needed, flag) from None
        raise
    return path


def publish(tmp, path, mode: int | None = None) -> None:
    """Give the finished file `tmp` the name `path`: mode, fsync, rename, fsync of the directory."""
    if mode is not None:
        os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(path) -> None:
    """Make a rename in `path` durable; best effort (some file systems refuse to open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path) -> None:
    """Remove a temporary; a read-only file system refuses the cleanup too, which is not the error to report."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def touch(path) -> bool:
    """Mark a cache entry used now (caches prune what is unused). True if it is there to use: touched,
    or present in a cache this process may not write (a read-only cache still serves)."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return Path(path).exists()


ABANDONED_ELSEWHERE = 86400  # seconds: another machine's (or container's) work, whose pid we cannot ask


def private_workdir(parent, name: str) -> Path:
    """A new `.tmp-<name>-<nonce>-<host>-<pid>` directory in `parent`, where one build makes an entry
    before renaming it into place; `remove_abandoned` clears those of builds that died."""
    work = Path(parent) / f".tmp-{name}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}-{os.getpid()}"
    work.mkdir(parents=True)
    return work


def remove_abandoned(parent, now: float | None = None) -> None:
    """The `private_workdir`s in `parent` whose process is gone: this machine's, by pid; another's (a
    home shared over the network or by containers), once a day old."""
    now = time.time() if now is None else now
    host = f"-{socket.gethostname()}"
    for work in Path(parent).glob(".tmp-*"):
        head, _, pid = work.name.rpartition("-")
        try:
            if head.endswith(host) and pid.isdigit():
                gone = not processes.alive(int(pid))
            else:
                gone = work.stat().st_mtime < now - ABANDONED_ELSEWHERE
        except (OSError, OverflowError, ValueError):
            continue
        if gone:
            shutil.rmtree(work, ignore_errors=True)
