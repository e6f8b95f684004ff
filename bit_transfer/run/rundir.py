"""The run directory: the one owner of every file a run writes (`fit`, `fewshot`, `eval`, `export`).

A directory is a run when bit-transfer made it or found it empty, and wrote its marker
`.bit-transfer-run`; nothing is written into a directory that holds files but no marker, so
`--run-dir .` cannot overwrite a user's own `recipe.yaml`. Files are written atomically (temporary,
fsync, rename); checkpoints keep the previous one until the new one is whole; a corrupt latest
checkpoint falls back to the one before it with a one-line notice. Ranks other than 0 read, never write.
One process writes a directory at a time: a writer holds an OS lock on the marker (`runlock`) for as
long as its `RunDir` lives, and a second writer is refused, naming the first, before it touches anything.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

from bit_transfer.run import lock as runlock, runlog
from bit_transfer.errors import StorageError, UsageError, WeightsError, storage_error

MARKER = ".bit-transfer-run"
CKPT_DIR = "checkpoints"
CKPT_NAME = re.compile(r"step-(\d+)\.ckpt$")
# Keys a resumed run may change: they alter what is logged, kept or how fast, never the weights.
RESUMABLE = ("train.device_id", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batch_size",
             "data.skip_corrupt", "data.workers", "data.cache_dir", "log.")


def flat(d: dict, prefix: str = "") -> dict:
    """{'train': {'seed': 0}} -> {'train.seed': 0}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Recipe keys added after runs were made, with the value a recipe without them meant.
ADDED_KEYS = {"train.freeze": "none"}


def recipe_diff(saved: dict, now: dict) -> list[str]:
    """The dotted keys whose values differ between two recipe dicts (a saved recipe older than a key
    counts as holding its default)."""
    a, b = ADDED_KEYS | flat(saved), flat(now)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def describe_diff(saved: dict, now: dict, keys: list[str], most: int = 3) -> str:
    """'rule.steps (20 there, 30 now), ...' for the first `most` differing keys, for one-line errors."""
    a, b = flat(saved), flat(now)
    shown = ", ".join(f"{k} ({a.get(k)!r} there, {b.get(k)!r} now)" for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class RunDir:
    """One run's directory. `claim` makes or opens it; the writers below are the only ones used."""

    def __init__(self, path: Path, *, kind: str, writer: bool = True, created: bool = False, flag: str | None = None):
        self.path, self.kind, self.writer, self.created = Path(path), kind, writer, created
        self.flag = flag  # the option that chooses this directory, for the fixes messages name
        self.lock: runlock.Lock | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ claiming
    @classmethod
    def claim(cls, path, *, kind: str, parent: str = "runs", name: str = "run", writer: bool = True,
              must_exist: bool = False, flag: str = "--run-dir", lock: bool = True) -> "RunDir":
        """A new run (`path` None: `<parent>/<name>-<timestamp>`), or the existing run at `path`.

        `must_exist` (`fit --resume DIR`): a missing or foreign directory is an error, not a fresh run.
        `flag` is the option the messages name (`--out` for eval and export, whose kind they also name).
        A writer takes the directory's lock; `lock=False` is for a writer whose launcher holds it
        (rank 0 of `fit --devices`), which leaves the clean-up to the holder.
        """
        if path is None:
            path = new_run_path(parent, name)
        path = Path(path).expanduser()
        noun = kind if kind in ("export", "eval") else "run"
        if path.exists() and not path.is_dir():
            example = "runs/my-run" if flag == "--run-dir" else f"{path.with_suffix('')}-{noun}"
            raise StorageError(f"{path} is a file; give a directory for the {noun} (e.g. {flag} {example})")
        owned = is_run(path)
        if must_exist and not owned:
            what = "does not exist" if not path.exists() else "is not a bit-transfer run"
            raise UsageError(f"--resume {path}: the directory {what}; pass the run directory that fit printed")
        if not owned and path.exists() and any(path.iterdir()):
            raise UsageError(f"{path} exists and holds files but is not a bit-transfer {noun}; "
                             f"choose a new or empty directory for the {noun} ({flag})")
        found = owned and owned_kind(path)
        if owned and found != kind:  # a fit never writes into an export, a sweep never into a fit run, ...
            raise UsageError(f"{path} is a bit-transfer {found} directory, not {KIND_LABELS.get(kind, kind)}; "
                             f"choose a new or empty directory for the {noun} ({flag})")
        run = cls(path, kind=kind, writer=writer, created=not path.exists(), flag=flag)
        if writer:
            run._mark()
        if writer and lock:
            run._lock(noun)
            for tmp in (path / CKPT_DIR).glob("*.ckpt.tmp"):  # what a kill -9 during a checkpoint write left
                shutil.rmtree(tmp, ignore_errors=True)
        return run

    def _mark(self) -> None:
        """Make the directory and its marker, unless there; never replace a marker (it is what the lock
        is taken on, and another process may hold it)."""
        marker = self.path / MARKER
        if marker.is_file():
            return
        about = runlog.to_json({"kind": self.kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        tmp = self.path / f"{MARKER}.{os.getpid()}.tmp"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(about)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, marker)  # whole, and only if no other process made one meanwhile
            except FileExistsError:
                pass
            except OSError as e:  # a file system without hard links
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                os.replace(tmp, marker)
        except OSError as e:
            raise storage_error(e, self.path, flag=self.flag) from None
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # no directory to hold it, or a read-only one
                pass

    def _lock(self, noun: str) -> None:
        """Hold the directory for this process, or refuse in one line naming the process that holds it."""
        try:
            self.lock = runlock.hold(self.path / MARKER)
        except runlock.Held as e:
            raise UsageError(f"{self.path} is in use by another bit-transfer process ({e.who}) writing this {noun}; "
                             f"wait for it to end (or stop it), or choose another directory ({self.flag})") from None
        except OSError as e:
            raise storage_error(e, self.path, flag=self.flag) from None
        found = owned_kind(self.path)
        if found != self.kind:  # another command made it between our look and the lock
            self.release()
            raise UsageError(f"{self.path} is a bit-transfer {found} directory, not {KIND_LABELS.get(self.kind, self.kind)}; "
                             f"choose a new or empty directory for the {noun} ({self.flag})")

    def release(self) -> None:
        """Let another process write here (also done by the kernel when this process ends)."""
        if self.lock:
            self.lock.close()
            self.lock = None

    def wait_for_lock(self) -> None:
        """Rank 0 of `fit --devices`: take the lock over the moment the launcher holding it dies."""
        if self.writer and (self.path / MARKER).is_file():
            runlock.hold_when_free(self.path / MARKER)

    def discard_if_unused(self) -> None:
        """After a failure before anything worth keeping (no checkpoint, no logged step: a diverged run's
        curve is kept for diagnosis): remove what this process made."""
        logged = self.path / "metrics.jsonl"
        if not self.writer or self.checkpoints() or self.finished() or (logged.is_file() and logged.stat().st_size):
            return
        launched = (self.path / "msrun").is_dir()  # `fit --devices`: its one-line error points to these logs
        if self.created and not launched:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for child in self.path.iterdir():  # it was empty, or a run with nothing to resume
                if not (launched and child.name in (MARKER, "msrun")):
                    _remove(child)
        if not launched:
            self.release()  # its marker is gone: a new claim makes a new one

    def restart(self) -> None:
        """Empty the run, marker kept: for runs that restart rather than resume (a linear probe: seconds)."""
        if not self.writer:
            return
        for child in self.path.iterdir():
            if child.name not in (MARKER, "evals"):  # `bit-transfer eval` results are the user's
                _remove(child)

    # ------------------------------------------------------------------ recipe and results
    def check_recipe(self, recipe_dict: dict, same_plan=None) -> list[str]:
        """Refuse to continue a run of another recipe; returns the resumable keys that changed.

        `same_plan(saved_dict)`: whether the saved recipe's rule resolves to this one's plan; rule keys
        spelled differently for the same plan (null vs the value the rule gives) are no change.
        """
        saved_path = self.path / "recipe.yaml"
        if not saved_path.is_file():
            return []
        import yaml

        saved = yaml.safe_load(saved_path.read_text()) or {}
        diff = recipe_diff(saved, recipe_dict)
        fixed = [k for k in diff if not resumable(k)]
        if fixed and same_plan and all(k.startswith("rule.") for k in fixed) and same_plan(saved):
            diff = [k for k in diff if k not in fixed]
            fixed = []
        if fixed:
            may = ", ".join(r + "*" if r.endswith(".") else r for r in RESUMABLE)
            raise UsageError(
                f"{self.path} holds a run of a different recipe: {describe_diff(saved, recipe_dict, fixed)}; rerun "
                f"with the run's own settings to resume it, or start a new run with another --run-dir "
                f"(only {may} may change)"
            )
        return diff

    def finished(self) -> dict | None:
        """metrics.json of a completed run, else None."""
        try:
            m = json.loads((self.path / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) and m.get("completed") else None

    def write_json(self, name: str, obj) -> Path:
        return self._write(name, runlog.write_json, obj)

    def write_yaml(self, name: str, obj) -> Path:
        return self._write(name, runlog.write_yaml, obj)

    def _write(self, name, writer, obj) -> Path:
        path = self.path / name
        if self.writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(path, obj)
        return path

    def replaced_note(self) -> str:
        """' (replaced the earlier ones there)' when this directory already holds results that the coming
        write_final replaces (eval and predict rerun into their own directory), else ''."""
        return " (replaced the earlier ones there)" if (self.path / "metrics.json").is_file() else ""

    def write_final(self, result, class_names: list[str], fields: dict, report_dir: str = "eval") -> dict:
        """metrics.json and the eval report (per-class accuracy, confusion), built in one place."""
        from bit_transfer.run.reports import save_report

        final = {"top1": result.top1, "top5": result.top5, "loss": result.loss, "eval_images": result.count,
                 "eval_images_per_sec": result.images_per_sec, **fields}
        if self.writer:
            try:
                save_report(result, list(class_names), self.path / report_dir)
            except OSError as e:
                raise storage_error(e, self.path / report_dir, flag=self.flag) from None
            self.write_json("metrics.json", final)
        return runlog.finite_or_none(final)

    def metrics_log(self, tensorboard: bool, resume_step: int | None = None):
        if not self.writer:
            return runlog.NullLog()
        return runlog.MetricsLog(self.path, tensorboard=tensorboard, resume_step=resume_step)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.path / CKPT_DIR / f"step-{step:06d}.ckpt"

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (by step)."""
        found = [p for p in (self.path / CKPT_DIR).glob("step-*.ckpt") if CKPT_NAME.search(p.name) and p.is_file()]
        return sorted(found, key=lambda p: int(CKPT_NAME.search(p.name).group(1)))

    def save_checkpoint(self, step: int, params: dict, meta: dict, keep: int) -> Path:
        """Write step-NNNNNN.ckpt atomically, then drop all but the newest `keep`."""
        from bit_transfer.models.weights import ckpt

        path = self.checkpoint_path(step)
        if not self.writer:
            return path
        needed = sum(int(getattr(v, "nbytes", 0) or 0) for v in params.values())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.save_checkpoint(path, params, meta)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(f"{path}.tmp", ignore_errors=True)
            if isinstance(e, RuntimeError):  # MindSpore's writer wraps the OSError
                e = os_error_in(e, path)
            raise _with_kept(storage_error(e, path, needed, flag=self.flag), self.checkpoints()) from None
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self, log=print):
        """(path, params, meta) of the newest readable checkpoint, or None; a corrupt newer one is
        named in one line and set aside (renamed *.corrupt), and the one before it is used."""
        from bit_transfer.models.weights import ckpt

        for path in reversed(self.checkpoints()):
            try:
                params, meta = ckpt.read_checkpoint(path)
            except WeightsError:
                aside = path.with_name(path.name + ".corrupt")
                if self.writer:
                    path.rename(aside)
                log(f"notice: {path.name} is truncated or corrupt (moved to {aside.name}); using the checkpoint before it")
                continue
            return path, params, meta
        return None

    def kept_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, for its one-line message."""
        ckpts = self.checkpoints()
        return f"the last good checkpoint {ckpts[-1]} is kept" if ckpts else "no checkpoint had been written"


def new_run_path(parent: str, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(parent).expanduser() / f"{name}-{stamp}"
    i = 1
    while path.exists():  # two runs started in the same second
        i += 1
        path = Path(parent).expanduser() / f"{name}-{stamp}-{i}"
    return path


def marker_kind(path: Path) -> str | None:
    """The kind ("fit", "eval", "export", ...) a directory's marker records, else None."""
    try:
        kind = json.loads((Path(path) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


KIND_LABELS = {"fit": "a fit run", "fewshot": "a few-shot sweep", "eval": "an eval output",
               "export": "an export output", "samples": "a samples folder"}


def owned_kind(path: Path) -> str:
    """What a directory bit-transfer owns holds; runs and sweeps made before the marker by their files."""
    return marker_kind(path) or ("fewshot" if (Path(path) / "sweep.yaml").is_file() else "fit")


def is_run(path: Path) -> bool:
    """A directory bit-transfer owns: its marker, or (runs made before the marker) its checkpoints."""
    if (path / MARKER).is_file() or (path / "sweep.yaml").is_file():  # sweeps made before the marker
        return True
    return (path / "recipe.yaml").is_file() and any((path / CKPT_DIR).glob("step-*.ckpt"))


def os_error_in(e: RuntimeError, path: Path) -> OSError:
    """MindSpore reports a failed write as RuntimeError; recover the cause from the free space."""
    import errno

    text = str(e).lower()
    if "no space" in text or shutil.disk_usage(path.parent).free < 2**20:
        return OSError(errno.ENOSPC, "No space left on device")
    if "read-only" in text:
        return OSError(errno.EROFS, "Read-only file system")
    return OSError(errno.EIO, str(e).splitlines()[0][:120])


def _with_kept(err: StorageError, ckpts: list[Path]) -> StorageError:
    kept = f"; the previous checkpoint {ckpts[-1].name} is kept" if ckpts else ""
    return StorageError(f"{err}{kept}")
