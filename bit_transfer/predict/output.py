"""What predict writes as it goes: the `--out` file (`OutFile`, .csv or .jsonl, moved into place at the
end) and the readable stdout `Table`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bit_transfer.data.split import Split
from bit_transfer.errors import UsageError, storage_error

OUT_SUFFIXES = (".csv", ".jsonl")


class OutFile:
    """--out: a .csv (path,pred,prob,topk) or .jsonl file, written to a temporary beside it and moved
    into place at the end; an existing file is never replaced without `overwrite`."""

    def __init__(self, path, overwrite: bool = False):
        self.path, self.overwrite = Path(path).expanduser(), overwrite
        self.format = self.path.suffix.lower()
        if self.format not in OUT_SUFFIXES:
            raise UsageError(f"--out {self.path}: give a .csv or .jsonl file (e.g. --out preds.csv)")
        if self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory; give a .csv or .jsonl file in it "
                             f"(e.g. --out {self.path / ('preds' + self.format)})")
        if self.path.exists() and not overwrite:
            raise UsageError(f"--out {self.path} exists; choose a new file, or add --overwrite to replace it")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides, as for any file
            self.file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        except OSError as e:
            raise storage_error(e, self.path, flag="--out") from None
        if self.format == ".csv":
            import csv

            self.csv = csv.writer(self.file, lineterminator="\n")
            self._guard(self.csv.writerow, ["path", "pred", "prob", "topk"])

    def write(self, path: str, names: list[str], probs: list[float]) -> None:
        if self.format == ".csv":
            topk = ";".join(f"{n}:{p:.6f}" for n, p in zip(names, probs))
            self._guard(self.csv.writerow, [path, names[0], f"{probs[0]:.6f}", topk])
        else:
            row = {"path": path, "pred": names[0], "prob": round(float(probs[0]), 6),
                   "topk": [[n, round(float(p), 6)] for n, p in zip(names, probs)]}
            self._guard(self.file.write, json.dumps(row, ensure_ascii=False) + "\n")

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            self.abort()
            raise storage_error(e, self.path, flag="--out") from None

    def commit(self) -> None:
        """Flush, fsync and move into place; without `overwrite`, a file that appeared meanwhile is kept."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                _link_new(self.tmp, self.path)
        except FileExistsError:
            self.abort()
            raise UsageError(f"--out {self.path} was created while predicting; it is kept: choose a new file, "
                             "or add --overwrite to replace it") from None
        except OSError as e:
            self.abort()
            raise storage_error(e, self.path, flag="--out") from None

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it (a hard link fails on an existing name)."""
    import errno

    try:
        os.link(tmp, path)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


class Table:
    """The readable stdout table: path, then the top-k classes with their probabilities."""

    def __init__(self, split: Split, names: list[str], k: int):
        widest = max((len(split.where(i)) for i in range(min(len(split), 10000))), default=4)
        self.path_width = min(max(widest, 4), 60)
        self.name_width = min(max(5, *(len(n) for n in names)), 24)
        self.k = k

    def header(self) -> str:
        cols = "  ".join(f"{'top-' + str(i + 1):<{self.name_width}} {'prob':>6}" for i in range(self.k))
        return f"{'path':<{self.path_width}}  {cols}".rstrip()

    def row(self, path: str, names: list[str], probs: list[float]) -> str:
        cols = "  ".join(f"{n:<{self.name_width}} {100 * p:5.1f}%" for n, p in zip(names, probs))
        return f"{path:<{self.path_width}}  {cols}"
