"""Graceful stop on SIGINT/SIGTERM for the whole of a `fit` or `fewshot`, from start-up to metrics.json.

The first signal asks to stop: training ends after the current step, a checkpoint is written and
the run is evaluated. A second signal stops the evaluation too. Neither ever interrupts a
checkpoint write (`critical`): a signal there is acted on once the file is whole.

MindSpore installs its own C-level SIGINT handler when its context starts, and that handler sends
the process SIGTERM (mindspore/ccsrc/utils/signal_util.cc, `DefaultIntHandler`), so Ctrl-C would
read as SIGTERM; `rearm` puts ours back after MindSpore has run, so the user's signal is reported.
"""

from __future__ import annotations

import contextlib
import signal

from bit_transfer.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Truthy once a signal asked to stop; `.name` is the signal's name (SIGINT, SIGTERM)."""

    def __init__(self):
        self.count = 0
        self.signal: int | None = None
        self._old: dict = {}
        self._deferred = False

    def __enter__(self):
        for s in SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame):
        self.count += 1
        self.signal = self.signal or signum
        if self.count > 2 and not self._deferred:  # a third signal: the user insists
            raise KeyboardInterrupt

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
