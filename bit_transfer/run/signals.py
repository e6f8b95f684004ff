"""Graceful stop on SIGINT/SIGTERM for the whole of a `fit` or `fewshot`, from start-up to metrics.json.

The first signal asks to stop: training ends after the current step, a checkpoint is written and
the run is evaluated. A second signal stops the evaluation too. Neither ever interrupts a
checkpoint write (`critical`): a signal there is acted on once the file is whole.

Python runs a handler once for any number of deliveries of one signal that arrive while the main
thread is inside C code (a checkpoint write): two quick SIGTERMs read as one. Signals are counted
from a wakeup pipe instead (CPython writes one byte per delivery), so a second signal is never lost.
(A second signal sent within microseconds of the first, while the kernel still holds that one pending,
is merged into it by the kernel and never delivered: no process can count it. A person's second Ctrl-C
or `kill` is far later than that.)

MindSpore installs its own C-level SIGINT handler when its context starts, and that handler sends
the process SIGTERM (mindspore/ccsrc/utils/signal_util.cc, `DefaultIntHandler`), so Ctrl-C would
read as SIGTERM; `rearm` puts ours back after MindSpore has run, so the user's signal is reported.
MindSpore's `SignalGuard` also installs that handler for each compiled graph's run and puts ours back
after it: a Ctrl-C that lands inside a step still reads as SIGTERM (the stop is the same).
"""

from __future__ import annotations

import contextlib
import os
import signal

from bit_transfer.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Signals that came while no StopFlag listened, from the CLI's first instruction on (`listen_early`).
PENDING: list[int] = []
_RAISE = [False]  # whether a signal also stops the command where it is (KeyboardInterrupt)


def listen_early() -> dict:
    """The CLI's first instruction: from now on a SIGINT or SIGTERM is noted, never a traceback from
    wherever it lands (an `import mindspore` cut in half). `fit` and `fewshot` stop at their first
    check, their StopFlag taking the signal over; other commands call `stop_at_once` once parsed.
    Returns the handlers it replaced (for `restore`)."""
    if signal.getsignal(signal.SIGINT) is not _note:  # not already listening (bit_transfer/__main__.py)
        PENDING.clear()
        _RAISE[0] = False
    return {s: signal.signal(s, _note) for s in SIGNALS}


def restore(handlers: dict) -> None:
    """Put back what `listen_early` replaced (the CLI called inside another program: its tests)."""
    for s, h in handlers.items():
        signal.signal(s, h)
    PENDING.clear()
    _RAISE[0] = False


def _note(signum, frame):
    PENDING.append(signum)
    if _RAISE[0]:
        raise KeyboardInterrupt


def stop_at_once() -> None:
    """Commands without a StopFlag (eval, predict, ...): a signal stops them where they are."""
    _RAISE[0] = True
    if PENDING:
        raise KeyboardInterrupt


def pending_name() -> str | None:
    """The name of the first signal noted outside a StopFlag, if any."""
    return signal.Signals(PENDING[0]).name if PENDING else None


class StopFlag:
    """Truthy once a signal asked to stop; `.name` is the signal's name (SIGINT, SIGTERM)."""

    def __init__(self):
        self.count = 0
        self.signal: int | None = None
        self._old: dict = {}
        self._deferred = False
        self._pipe = None  # (read fd, write fd, the wakeup fd it replaced)

    def __enter__(self):
        if PENDING:  # signals that came before this flag listened (`listen_early`)
            self.count, self.signal = len(PENDING), PENDING[0]
            PENDING.clear()
        for s in SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        if self._old:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._pipe = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self._pipe:
            r, w, previous = self._pipe
            signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)
            self._pipe = None

    def _deliveries(self) -> int:
        """SIGINT/SIGTERM deliveries not yet counted (1 without a wakeup pipe)."""
        if not self._pipe:
            return 1
        try:
            data = os.read(self._pipe[0], 4096)
        except BlockingIOError:  # an earlier call of the handler counted them already
            return 0
        return sum(b in SIGNALS for b in data)

    def _handle(self, signum, frame):
        # at least one: a library that took the wakeup fd over must not make a signal vanish
        self.count += max(self._deliveries(), 0 if self.count else 1)
        self.signal = self.signal or signum
        if self.count > 2 and not self._deferred:  # a third signal: the user insists
            raise KeyboardInterrupt

    def request(self, signum: int) -> None:
        """Stop as if `signum` had arrived here (another rank received it)."""
        if not self:
            self.count, self.signal = 1, signum

    def pass_on(self) -> None:
        """Hand a signal the command did not act on to the CLI, which says so and exits 130 (when the CLI
        listened before this flag: not inside another program calling `fit`)."""
        if self.signal and _note in self._old.values():
            PENDING.append(self.signal)

    def rearm(self) -> None:
        """Take SIGINT back from MindSpore (see the module docstring); cheap enough for every step."""
        if self._old:
            signal.signal(signal.SIGINT, self._handle)

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def hard(self) -> bool:
        """A second signal: skip the evaluation as well."""
        return self.count > 1

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "signal"

    def check(self, what: str, resume_hint: str) -> None:
        """Between set-up phases: stop now with one line if a signal came."""
        if self:
            raise Interrupted(f"{self.name} while {what}; {resume_hint}")

    @contextlib.contextmanager
    def critical(self):
        """A checkpoint write: signals wait until it is whole."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
