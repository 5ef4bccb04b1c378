"""SIGTERM / SIGINT: finish the iteration, let the hooks save, exit with 143 / 130.

Schedulers (Slurm's ``scancel`` and preemption, Kubernetes) and terminals signal the whole
process group: every rank, the launcher and the DataLoader workers. The workers ignore the
signals (``hooktrain.data.reading.worker_init``); each rank notes the request here, and the
ranks agree on it once per iteration (``hooktrain.engine.agreement``) so none is left waiting in a
collective.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

#: Exit codes of an interrupted run (shell convention 128 + signal number).
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
#: A repeat of the stopping signal within this many seconds is the same request, not a second.
REPEAT_S = 2.0


class Abort(KeyboardInterrupt):
    """A second stopping signal: the run ends at once, without saving."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"second {signal_name}: aborting without saving")
        self.exit_code = EXIT_CODES[signal_name]


class StopSignals:
    """While entered, SIGTERM/SIGINT set ``requested`` (the first signal's name) instead of
    killing the process; a second signal after ``REPEAT_S`` raises ``Abort`` at once. The same signal again within ``REPEAT_S`` is a repeat: ``accelerate launch``
    forwards the signal its process group was already sent.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._received_at = name, time.monotonic()
            return
        if name == self.requested and time.monotonic() - self._received_at < REPEAT_S:
            return
        raise Abort(name)
