"""Data-parallel training on MindSpore's own stack: `msrun` launches, `mindspore.communication` reduces.

Each rank reads a disjoint shard of every logical batch (batch = ranks x batch_split x micro-batch),
gradients are mean-all-reduced once per optimizer step, and rank 0 alone writes the run
directory. `bit-transfer fit RECIPE --devices N` starts `msrun` for you; under `msrun` (the
documented multi-machine form) each worker finds its rank from the environment msrun sets.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_transfer import settings
from bit_transfer.system import processes
from bit_transfer.errors import Interrupted, RunError, UsageError

MSRUN_ENV = "MS_WORKER_NUM"  # set by msrun in every worker it spawns


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_msrun() -> bool:
    return int(os.environ.get(MSRUN_ENV, "1")) > 1


def local_ranks() -> int:
    """The ranks sharing this machine's CPUs (for the decode threads' default): what `fit --devices N`
    started, else under a plain msrun all of its ranks (it does not tell a worker how many share its
    node: fewer threads, never too many), else 1."""
    return settings.local_ranks() or max(1, int(os.environ.get(MSRUN_ENV, "1") or 1))


def under_launcher() -> bool:
    """A worker of `fit --devices`: its launcher holds the run directory's lock (not a plain msrun)."""
    return settings.launcher_pid() > 0


def watch_launcher(period_s: float = 1.0) -> None:
    """In a worker of `fit --devices`: if the launcher dies (`kill -9`, the OOM killer), SIGTERM this
    process, so the ranks stop together at a step with a checkpoint as for a forwarded signal,
    instead of training on unseen. Nothing under a plain msrun (no launcher to watch)."""
    pid = settings.launcher_pid()
    if pid <= 0:
        return

    def watch():
        while processes.alive(pid):
            time.sleep(period_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


@functools.cache
def world() -> World:
    """This process's rank and the number of ranks; initialises communication once under msrun.

    Call after `runtime.setup` chose the device (MindSpore requires the device before init()).
    """
    if not launched_by_msrun():
        return World()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    w = World(get_rank(), get_group_size())
    # the launcher maps a failed worker's pid (what msrun reports) back to its rank with this line
    print(f"bit-transfer rank {w.rank} of {w.size}, pid {os.getpid()}", flush=True)
    return w


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a host array over all ranks (metrics, not gradients: those reduce inside the graph)."""
    if world().size == 1:
        return values
    import mindspore as ms
    from mindspore import ops

    arr = np.asarray(values, np.float64)
    out = ops.AllReduce()(ms.Tensor(arr.astype(np.float32)))
    return out.asnumpy().astype(np.float64).reshape(arr.shape)


def check_same_step(step: int | None) -> None:
    """All ranks must start from the same checkpoint: each one's step (None: no checkpoint) is gathered
    with one collective, so every rank refuses with the same line, or none does. Ranks differ when
    their run directories are not one shared directory (another machine's disk, a stale copy)."""
    w = world()
    if w.size == 1:
        return
    mine = np.zeros((w.size, 2))  # (step // 2^20, step % 2^20): exact in the float32 the reduction uses
    mine[w.rank] = (-1, 0) if step is None else divmod(step, 1 << 20)
    steps = [int(hi) * (1 << 20) + int(lo) if hi >= 0 else -1 for hi, lo in all_reduce_sum(mine)]
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {r}: {'no checkpoint' if v < 0 else f'step {v}'}" for r, v in enumerate(steps))
        raise UsageError(f"the ranks would resume from different steps ({seen}); every rank must see the same "
                         "run directory: put --run-dir on storage that all machines share")


# ----------------------------------------------------------------------------- the launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_command(
    fit_args: list[str],
    *,
    devices: int,
    log_dir: Path,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
) -> list[str]:
    """The msrun command line that runs `bit-transfer fit ...` on `devices` workers per node."""
    msrun = shutil.which("msrun", path=_path_with_this_python())
    if not msrun:
        raise UsageError("msrun is not on PATH; it ships with MindSpore: reinstall mindspore in this environment")
    main = Path(__file__).resolve().parents[1] / "entry" / "msrun_worker.py"
    return [
        msrun,
        f"--worker_num={devices * nodes}",
        f"--local_worker_num={devices}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port or free_port()}",
        f"--node_rank={node_rank}",
        f"--log_dir={log_dir}",
        "--join=True",
        "--tail_worker_log=0",
        str(main),
        "fit",
        *fit_args,
    ]


def _path_with_this_python() -> str:
    """msrun starts workers with `python` from PATH: make it this interpreter's."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def launch(fit_args: list[str], run_dir: Path, *, devices: int, **msrun_kw) -> int:
    """Run `fit` on `devices` ranks under msrun and wait; name the rank that failed, if any.

    Rank 0's log (tailed by msrun) is printed as it comes (`_relay`; the one-line error names the
    log of a rank that failed). SIGINT, SIGTERM and SIGHUP here go on to the workers, which stop
    together at a step, checkpoint and exit (`fit`'s own signal handling); then 130, as a one-rank
    `fit`. msrun runs in its own session: Ctrl-C would otherwise reach it too, and it kills the
    workers outright.
    """
    log_dir = run_dir / "msrun"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = msrun_command(fit_args + ["--run-dir", str(run_dir)], devices=devices, log_dir=log_dir, **msrun_kw)
    env = dict(os.environ, PATH=_path_with_this_python(),
               **{settings.LAUNCHER_PID: str(os.getpid()), settings.LOCAL_RANKS: str(devices)})
    print(f"launching {devices} ranks with msrun; worker logs in {log_dir}", flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    signalled = []

    def forward(signum):
        signalled.append(signum)
        if not _signal_workers(proc.pid, signal.SIGTERM if signum == signal.SIGHUP else signum):
            proc.send_signal(signal.SIGINT)  # no workers found (no /proc): msrun stops them its way

    with _forwarding_signals(forward):
        try:
            output = _relay(proc)
            code = proc.wait()
        except BaseException:  # this process is going (a bug): stop the ranks rather than orphan them
            _signal_workers(proc.pid, signal.SIGTERM)
            raise
    if signalled and code != 0:  # stopped before training began (the workers exit 0 once it has)
        raise Interrupted(f"{signal.Signals(signalled[0]).name}: the ranks were stopped; "
                          "rerun the same command to resume from the last checkpoint")
    if code != 0:
        raise RunError(failure_message(output, log_dir))
    return 130 if signalled else 0


def _relay(proc: subprocess.Popen) -> str:
    """msrun's output, all of it; printed as it comes but for msrun's chatter, anything from a
    traceback on and anything once our stdout is closed (`fit ... | head`: the ranks train on). A
    failed worker's line stops msrun's scheduler soon after."""
    output, failing, shown = [], False, True
    for line in proc.stdout:
        output.append(line)
        if FAILED_WORKER.search(line):
            _stop_scheduler_soon(proc.pid)
        failing = failing or line.startswith("Traceback")  # msrun's or a rank's: the logs keep it
        if shown and not failing and not re.match(r"^\[(WARNING|INFO|ERROR|DEBUG)\] ", line):
            try:
                print(line, end="", flush=True)
            except (BrokenPipeError, ValueError):
                shown = False
    return "".join(output)


@contextlib.contextmanager
def _forwarding_signals(forward):
    """Call `forward(signum)` for SIGINT/SIGTERM/SIGHUP instead of dying of them, until the block ends."""
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda signum, _frame: forward(signum)) for s in caught}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; elsewhere none)."""
    kids = []
    for proc in Path("/proc").glob("[0-9]*"):
        fields = processes.stat_fields(int(proc.name))  # [] if gone meanwhile, or not ours to read
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(proc.name))
    return kids


def _signal_workers(msrun_pid: int, signum: int) -> int:
    """Send `signum` to msrun's workers (the processes running our worker entry), not to its scheduler
    (the workers stop gracefully on SIGINT and SIGTERM only); how many there were."""
    return _signal_children(msrun_pid, signum, str(Path(__file__).resolve().parents[1] / "entry" / "msrun_worker.py"))


def _signal_children(pid: int, signum: int, running: str = "") -> int:
    """Send `signum` to `pid`'s children whose command line holds `running`; how many got it."""
    sent = 0
    for child in _children(pid):
        try:
            if running.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                os.kill(child, signum)
                sent += 1
        except OSError:  # gone meanwhile
            continue
    return sent


# msrun's line for a worker that died; it then kills the other workers, but waits for its scheduler,
# which declares the dead node lost only after MindSpore's node timeout (30 s measured): a stopped
# run would sit that long before saying so. A low MS_NODE_TIMEOUT instead would fail healthy runs
# whose heartbeats are late on a loaded machine.
FAILED_WORKER = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")
SCHEDULER_GRACE_S = 3.0  # msrun kills the workers first (within its 1 s poll); then its scheduler goes


def _stop_scheduler_soon(msrun_pid: int) -> None:
    """SIGKILL what msrun still runs (its scheduler) in SCHEDULER_GRACE_S."""
    timer = threading.Timer(SCHEDULER_GRACE_S, _signal_children, [msrun_pid, signal.SIGKILL])
    timer.daemon = True
    timer.start()


def failure_message(msrun_output: str, log_dir: Path) -> str:
    """'rank R failed: <its last error line>' from msrun's output and the workers' logs."""
    pids = {}
    for log in sorted(log_dir.glob("worker_*.log")):
        text = log.read_text(errors="replace")
        m = re.search(r"bit-transfer rank (\d+) of \d+, pid (\d+)", text)
        if m:
            pids[m.group(2)] = (int(m.group(1)), log, text)
    m = FAILED_WORKER.search(msrun_output)
    if m and m.group(1) in pids:
        rank, log, text = pids[m.group(1)]
        errors = [ln for ln in text.splitlines() if "error:" in ln.lower() or ln.startswith(("RuntimeError", "Error", "bit-transfer"))]
        last = errors[-1].strip() if errors else f"exit code {m.group(2)}"
        return (
            f"rank {rank} failed ({last[:200]}); the other ranks were stopped; see {log}; "
            "rerun the same command to resume from the last checkpoint"
        )
    return f"the distributed run failed; see the worker logs in {log_dir}; rerun the same command to resume"
