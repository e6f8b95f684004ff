"""What a run writes for people: atomic files, strict JSON, metrics.jsonl, TensorBoard, the progress bar."""

from __future__ import annotations

import json
import time
import math
import sys
import threading
from pathlib import Path

import yaml

from bit_transfer import settings
from bit_transfer.system import files
from bit_transfer.errors import storage_error


def write_atomic(path: Path, text: str) -> None:
    """Write via a per-process temporary, fsync and rename: readers, and other processes writing the
    same file (the shared feature cache), see the old file or the new one, never a part. A failed
    write (disk full, read-only) removes the temporary and is one line naming the place."""
    data = text.encode()
    files.atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=None, needed=len(data))


def finite_or_none(obj):
    """NaN and infinities as None, recursively: JSON has no NaN, and strict readers refuse it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON (NaN -> null): what every JSON file bit-transfer writes goes through."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj) -> None:
    write_atomic(path, to_json(obj) + "\n")


def write_yaml(path: Path, obj) -> None:
    write_atomic(path, yaml.safe_dump(obj, sort_keys=False))


class MetricsLog:
    """One JSON line per logged step in metrics.jsonl, the same scalars in TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: rows logged after it belong to steps a killed process ran but never
        checkpointed; they are dropped (and purged from TensorBoard) so each step is logged once."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        try:
            self.file = open(self.path, "a", buffering=1)
        except OSError as e:
            raise storage_error(e, self.path) from None
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            _quiet_tensorboard_threads()
            purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self.tb = SummaryWriter(logdir=str(run_dir), flush_secs=10, **purge)

    def _truncate_after(self, step: int) -> None:
        try:
            lines = self.path.read_text().splitlines(keepends=True)
        except OSError:
            return
        keep = [ln for ln in lines if _row_step(ln) <= step]
        if len(keep) < len(lines):
            write_atomic(self.path, "".join(keep))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if TB_THREAD_ERRORS:
            raise storage_error(TB_THREAD_ERRORS.pop(), self.path.parent / "events.out.tfevents.*") from None
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        try:
            self.file.write(to_json(row, indent=None) + "\n")
        except OSError as e:
            raise storage_error(e, self.path) from None
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)

    def text(self, tag: str, text: str) -> None:
        if self.tb:
            self.tb.add_text(tag, text.replace("\n", "  \n"))

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.tb:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.tb.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()}, name="hparams")

    def close(self) -> None:
        """Never raises: after a full disk the error was already reported in one line, and what
        could not be flushed is the part of the log the failed write lost."""
        try:
            self.file.close()
        except OSError:
            pass
        if self.tb:
            try:
                self.tb.close()
            except Exception:  # a full disk: tensorboardX re-raises the failed flush here...
                _give_up_tensorboard(self.tb)
            self.tb = None


def _give_up_tensorboard(tb) -> None:
    """...and would again in its atexit hook, as a traceback after our one-line error: stop its
    writer threads and mark them closed (private attributes of tensorboardX's EventFileWriter)."""
    for writer in (getattr(tb, "all_writers", None) or {}).values():
        event_writer = getattr(writer, "event_writer", None)
        if event_writer is None:
            continue
        try:
            event_writer._worker.stop()
        except Exception:
            pass
        event_writer._closed = True


TB_THREAD_ERRORS: list[OSError] = []  # a full disk met by tensorboardX's writer thread


def _quiet_tensorboard_threads() -> None:
    """tensorboardX writes from a thread of its own; a full disk there would print a traceback in the
    middle of training. Keep the error instead: the next `MetricsLog.log` reports it in one line."""
    previous = threading.excepthook
    if getattr(previous, "bit_transfer", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_EventLoggerThread" and issubclass(args.exc_type, OSError):
            TB_THREAD_ERRORS.append(args.exc_value)
            return
        previous(args)

    hook.bit_transfer = True
    threading.excepthook = hook


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line from a kill: dropped too


class NullLog:
    """What ranks other than 0 log to: nothing (rank 0 alone writes the run directory)."""

    def log(self, step, scalars) -> None:
        pass

    def text(self, tag, text) -> None:
        pass

    def hparams(self, hparams, metrics) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """A tqdm bar (step, loss, lr, images/s, ETA); in quiet mode a plain line at each log point."""

    def __init__(self, total: int, initial: int, quiet: bool):
        self.quiet = quiet or not sys.stderr.isatty() and not settings.progress_bar()
        self.bar = None
        if not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.total = total

    def update(self, step: int, loss: float, lr: float, ips: float, eta: float | None = None, force_line: bool = False):
        if self.bar:  # the loss is read from the device at log points: "-" before the first one
            self.bar.set_postfix(loss=f"{loss:.4f}" if loss == loss else "-", lr=f"{lr:.2e}", img_s=f"{ips:.1f}",
                                 refresh=False)
            self.bar.update(step - self.bar.n)
        elif force_line:
            eta_s = f" eta {eta / 60:.1f} min" if eta is not None else ""
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {ips:.1f} img/s{eta_s}", flush=True)

    def write(self, msg: str) -> None:
        if self.bar:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None


class Throughput:
    """Images/s over the last log window, the share of it the loop waited for data, and an ETA from
    the steps this process ran (not the resumed ones). On Ascend/GPU, whose steps run queued, `fit`
    counts a wait only right after it read the device: there the share is a lower bound."""
    INPUT_BOUND = 0.2  # a run that waited for data this share of its steps' time is called input-bound

    def __init__(self, batch: int, step: int):
        self.batch, self.first = batch, step
        self.window_t, self.window_steps, self.ips = time.perf_counter(), 0, float("nan")
        self.t1 = None  # after this process's first step, which carries the compile
        self.window_wait = self.data_wait = 0.0  # this log window's share, and the whole run's seconds
        self.run_t = None

    def waited(self, seconds: float) -> None:
        """The loop waited `seconds` for the next micro-batches (the decode workers had not kept up)."""
        self.window_wait += seconds
        if self.t1 is not None:  # the first step's wait is start-up, not the pipeline's pace
            self.data_wait += seconds

    def tick(self) -> None:
        self.window_steps += 1
        if self.t1 is None:
            self.t1 = time.perf_counter()

    def window(self) -> tuple[float, float]:
        """(images/s, share of wall time waiting for data) since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self.window_t, 1e-9)
        self.ips = self.window_steps * self.batch / elapsed
        share = min(self.window_wait / elapsed, 1.0)
        self.window_t, self.window_steps, self.window_wait = now, 0, 0.0
        return self.ips, share

    def wait_share(self) -> float | None:
        """The share of this process's training time (after its first step) spent waiting for data."""
        if self.t1 is None:
            return None
        return min(self.data_wait / max(time.perf_counter() - self.t1, 1e-9), 1.0)

    def eta(self, step: int, total: int) -> float | None:
        done = step - self.first - 1  # steps timed since the first one
        if done < 1:
            return None
        return (total - step) * (time.perf_counter() - self.t1) / done
