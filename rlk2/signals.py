"""Stopping a run cleanly: SIGINT/SIGTERM finish the current step, write a checkpoint and exit 0."""

from __future__ import annotations

import signal


class GracefulStop:
    """Installs handlers for SIGINT and SIGTERM; the loop checks `requested` after each step. A second signal
    raises KeyboardInterrupt at once (the user really wants out now). `restore` puts the old handlers back."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
