"""Stopping a run cleanly: the first SIGINT/SIGTERM finishes the step, writes a checkpoint and exits 0; a second
stops at once, but never in the middle of a weight update; a third aborts wherever the run is."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator


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
        self._critical = self._pending = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, _frame) -> None:
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
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A block a second signal does not cut: it is delivered (KeyboardInterrupt) when the block ends."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
