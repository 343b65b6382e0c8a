"""Stopping a run cleanly: the first SIGINT/SIGTERM finishes the step, writes a checkpoint and exits 0; a second
stops at once, but never in the middle of a weight update; a third aborts wherever the run is.

Python raises a handler's exception wherever the main thread happens to be, and when that is a finalizer (a
`__del__` run by the garbage collector, e.g. a progress bar's) the exception is printed and swallowed: the stop
would be lost. So a signal that lands in one is held, and `interruption_point()`, which the long loops call (every
decode step, between the phases of a training step), raises it a moment later.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Iterator

_active: GracefulStop | None = None


def interruption_point() -> None:
    """Raise a KeyboardInterrupt held back by the installed `GracefulStop` (see the module docstring); cheap."""
    if _active is not None and _active._held and not _active._critical:
        _active._held = False
        raise KeyboardInterrupt


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


class GracefulStop:
    """Installs handlers for SIGINT and SIGTERM; the loop checks `requested` after each step.

    A second signal raises KeyboardInterrupt at once, unless the loop is inside `critical()` (the weight update and
    the step's log): then it is raised when that block ends, so the weights, the optimizer state and the metrics
    always agree on a step that can be checkpointed. A third signal raises at once, even there (no checkpoint can
    be consistent then). `restore` puts the old handlers back.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signals = 0
        self._critical = self._pending = self._held = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        if self._previous:
            global _active
            _active = self

    def _handle(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            self.requested = signal.Signals(signum).name
            return
        if self.signals == 2 and self._critical:
            self._pending = True
            print(
                "\nstopping as soon as this update is finished (once more to abort without a checkpoint)",
                file=sys.stderr,
                flush=True,
            )
            return
        if self.signals == 2 and _in_finalizer(frame):  # raised here it would be swallowed: raise it a moment later
            self._held = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A block a second signal does not cut: it is delivered (KeyboardInterrupt) when the block ends."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending or self._held:
            self._pending = self._held = False
            raise KeyboardInterrupt

    def restore(self) -> None:
        """Put the old handlers back; after a stop was asked for, a further signal ends the process at once
        instead (the run is over by then, and Python's own handler would raise into whatever cleanup runs)."""
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, exit_at_once if self.signals else handler)
        self._previous = {}
        if _active is self:
            _active = None


def exit_at_once(signum, _frame) -> None:
    """A signal handler for a process whose work is done: flush and exit with 128 + signum, without raising into
    the interpreter's shutdown (an exception raised in an atexit callback or a finalizer prints a traceback)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(128 + signum)


def exit_at_once_from_now() -> None:
    """Make SIGINT and SIGTERM end the process at once from here on (`exit_at_once`); main thread only. The last
    exit step ignores them (see `_ignore_late_signals`)."""
    global _ignore_at_exit
    _ignore_at_exit = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, exit_at_once)
        except ValueError:
            pass


_ignore_at_exit = False


def _ignore_late_signals() -> None:
    """Python's finalization puts every signal whose handler is a Python function back to the system default once
    the exit callbacks have run, so a Ctrl-C landing in that last moment killed a process that had finished and
    chosen its exit status (-2 instead of 0 or 130, seen in CI). Ignoring the signals instead survives that reset
    (finalization leaves SIG_IGN alone) and covers every thread; blocking them, as this did before, only covered
    the main thread, and the kernel hands a process-wide signal to any thread that has not blocked it. Registered
    when this module is first imported (before torch and the rest), so it runs after the other exit callbacks,
    while `exit_at_once` can still cut a slow one short."""
    if _ignore_at_exit:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


atexit.register(_ignore_late_signals)
