"""No silent hangs: when a collective fails or times out, every rank ends, naming the stage.

Each rank keeps the name of the stage it is in (``"train step"``, ``"hook 'eval'
(after_train_iter)"``), which costs an attribute write. The collectives themselves time out
after ``train.collective_timeout`` (the process group's timeout). The ranks then talk
through the launcher's key-value store (``torch.distributed``'s default store), which
outlives any one rank:

- A rank whose own code raised posts ``rank R raised in STAGE: ERROR`` before it exits. The
  ranks that were waiting for it in a collective end with that line.
- A rank whose collective timed out without such a post, or failed at once because a rank
  died without one (``kill -9``, a machine lost: its connections close), asks every rank where
  it is. A watcher thread on each rank answers with its stage; a rank that does not answer is
  named; a rank that is not in a failing collective of its own (it stopped calling
  collectives, or runs something else) then prints that it did not arrive and ends its
  process after a short grace period.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import torch.distributed as dist

from hooktrain.errors import RunError, first_line

logger = logging.getLogger("hooktrain")

_RAISED = "raised"
_ALERT = "alert"
_POLL_S = 1.0
_ANSWER_WAIT_S = 5.0  # how long a timed-out rank waits for the others to say where they are
_CONNECTION_LOST = ("Connection closed by peer", "Connection reset by peer")  # gloo's, when a rank died


class RankWatch:
    """The stage this rank is in, and what to say when a collective fails (see module doc)."""

    def __init__(self, rank: int, num_processes: int, timeout_s: float) -> None:
        self.rank, self.num_processes, self.timeout_s = rank, num_processes, timeout_s
        self.stage = "start-up"
        self.iteration = 0
        self._store = None
        self._failing = False  # this rank's main thread is handling a failure already
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if num_processes > 1 and dist.is_available() and dist.is_initialized():
            # torch elastic keeps its store across restarts of the ranks: a key per attempt
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.distributed_c10d._get_default_store()
            self._store = dist.PrefixStore(f"hooktrain/{attempt}/", store)
            self._thread = threading.Thread(target=self._watch, name="hooktrain-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the watcher thread; call it before the process group is destroyed (a thread
        inside a store call then would abort the process)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * _POLL_S)

    def enter(self, stage: str, iteration: int | None = None) -> None:
        """Note the stage the main thread starts (``iteration``: the one in progress)."""
        self.stage = stage
        if iteration is not None:
            self.iteration = iteration

    def where(self) -> str:
        return f"{self.stage} at iteration {self.iteration}"

    def failed(self, exc: BaseException) -> BaseException:
        """What to raise for ``exc``, which ended this rank's loop: a one-line ``RunError``
        when a collective broke (naming the rank that raised or did not arrive); ``exc``
        itself after posting it for the other ranks when this rank's own code raised."""
        self._failing = True
        if self._store is None or isinstance(exc, KeyboardInterrupt):
            return exc
        if not isinstance(exc, dist.DistError) and "gloo" not in str(exc).lower():
            if not isinstance(exc, RunError) or exc.per_rank:  # agreed errors: every rank raises them
                self._set(_RAISED, f"rank {self.rank} raised in {self.where()}: "
                                   f"{type(exc).__name__}: {first_line(exc)}")  # fmt: skip
            return exc
        here = f"rank {self.rank} stopped in {self.where()}"
        raised = self._get(_RAISED, wait_s=2.0)
        if raised is not None:
            return _CollectiveFailure(f"{here}: {raised}")
        if any(text in str(exc) for text in _CONNECTION_LOST):  # gloo fails at once, without the timeout
            alert = "lost its connection to another rank"
            cause = "a connection to another rank closed (a rank died, or its machine is gone)"
        else:
            alert = f"timed out after {self.timeout_s:g} s"
            cause = (f"a collective timed out after {self.timeout_s:g} s (train.collective_timeout) "
                     "waiting for the other ranks")  # fmt: skip
        self._set(_ALERT, f"rank {self.rank} {alert} in {self.where()}")
        stages = {r: self._get(f"stage/{r}", wait_s=_ANSWER_WAIT_S)
                  for r in range(self.num_processes) if r != self.rank}  # fmt: skip
        away = [f"rank {r} is in {s}" for r, s in stages.items() if s and s != self.where()]
        silent = [str(r) for r, s in stages.items() if s is None]
        detail = "; ".join(
            away + ([f"rank(s) {', '.join(silent)} did not answer"] if silent else [])
        )
        return _CollectiveFailure(f"{here}: {cause}; {detail or 'every rank is at the same stage'}")

    # -- the watcher thread -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(_POLL_S):
            try:
                if not self._store.check([_ALERT]):
                    continue
                alert = self._store.get(_ALERT).decode()
                self._set(f"stage/{self.rank}", self.where())
            except Exception:  # noqa: BLE001 - the store went away: the launcher is ending the run
                return
            time.sleep(_ANSWER_WAIT_S + _POLL_S)  # a rank failing on its own reports itself
            if not self._failing and not self._closed.is_set():
                _end_process(f"[rank {self.rank}] {alert}; this rank was in {self.where()}, "
                             "so it never arrived")  # fmt: skip
            return

    def _set(self, key: str, value: str) -> None:
        try:
            self._store.set(key, value)
        except Exception:  # noqa: BLE001 - best effort: the store may be gone already
            pass

    def _get(self, key: str, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._store.check([key]):
                    return self._store.get(key).decode()
            except Exception:  # noqa: BLE001
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


class _CollectiveFailure(RunError):
    per_rank = True


def _end_process(message: str) -> None:
    """End a rank whose main thread is stuck: one line, flushed, then exit 1."""
    print(f"hooktrain: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
