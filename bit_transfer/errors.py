"""Errors a user can fix: the CLI prints their message as one line and exits with code 2."""

import errno
import shutil
from contextvars import ContextVar
from pathlib import Path


class UsageError(Exception):
    """Base class: bad recipe, missing data or weights, a file that is not what it claims.

    The message must say what is wrong and how to fix it, in one line.
    """

    exit_code = 2


class RecipeError(UsageError):
    """A recipe key, value or file is invalid."""


class DataError(UsageError):
    """A dataset is missing, unreadable or inconsistent."""


class WeightsError(UsageError):
    """A weights file is missing, corrupt or does not fit the model."""


class RunError(UsageError):
    """A run stopped for a reason the user must act on (diverged, a rank died); exit code 1."""

    exit_code = 1


class Interrupted(RunError):
    """A signal stopped the command; what was written is complete and a rerun continues. Exit 130."""

    exit_code = 130
    label = "interrupted"


class StorageError(UsageError):
    """A place cannot be written: a file where a directory should be, read-only, no space left."""


# The option that chooses where the running command writes (`--run-dir` for fit, `--out` for export...),
# set by the CLI for the command; a place chosen by another option (`--feature-cache`) names its own.
PLACE_OPTION: ContextVar[str | None] = ContextVar("PLACE_OPTION", default=None)


def storage_error(e: OSError, path, needed: int | None = None, flag: str | None = None) -> StorageError:
    """One line for an OSError met while writing `path`: what happened and what to do (with `flag`,
    else the command's PLACE_OPTION: the option that chooses another place)."""
    path = Path(path)
    flag = flag or PLACE_OPTION.get()
    with_flag = f" with {flag}" if flag else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        need = f"about {_mb(needed)} needed, " if needed else ""
        return StorageError(f"no space left writing {path} ({need}{_mb(free)} free); free some space and rerun")
    if e.errno == errno.EROFS:
        return StorageError(f"{path} is on a read-only file system; choose a writable place{with_flag}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"no permission to write {path}; choose a place you can write to{with_flag}")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(e, (NotADirectoryError, FileExistsError)):
        return StorageError(f"cannot create {path}: a file stands where a directory should be; choose another "
                            f"path{with_flag}")
    return StorageError(f"cannot write {path}: {e.strerror or e}")


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return 0


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MB"
