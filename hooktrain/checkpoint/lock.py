"""One work dir, one run: the lock a training run holds on its work directory.

``<work_dir>/.hooktrain.lock`` is locked (``fcntl.lockf``, a POSIX record lock) for as long as
the run lives and names its holder (host, PID, start time) for the message a second run prints.
The kernel drops the lock when its process dies, however it dies, and DataLoader workers forked
from the run do not inherit it; so on one host a lock is never stale: a run that finds the file
locked refuses at once, and one that finds it unlocked but still naming a holder (kill -9, a
crash) takes it over with one warning.

Locks are not seen across hosts on every shared file system, so the holder also touches
the file every :data:`HEARTBEAT_S` seconds. A record from another host whose file was touched
within :data:`OTHER_HOST_STALE_S` seconds is taken as a live run there and refused; an older
one was left by a node that went away, and is taken over with a warning.

Only the main process of a run locks (``RANK`` 0 under ``accelerate launch``); ``hooktrain
test``, ``export`` and ``predict`` never do: they read complete checkpoints only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from hooktrain.checkpoint.layout import LOCK_FILE
from hooktrain.errors import UserError

logger = logging.getLogger("hooktrain")

HEARTBEAT_S = 30.0
OTHER_HOST_STALE_S = 600.0  # 20 missed heartbeats: that node is gone


class WorkDirLock:
    """The lock of a work dir, taken by :func:`lock_work_dir` and given back by :meth:`release`
    (also usable as a context manager)."""

    def __init__(self, path: Path, fd: int, created_dir: bool, took_over: str | None) -> None:
        self.path = path
        self.took_over = took_over  # the stale holder's description, when it was taken over
        self._fd = fd
        self._created_dir = created_dir
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="hooktrain-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)
            except OSError:  # a full or vanished file system: the run reports its own errors
                pass

    def release(self) -> None:
        """Remove the lock file and unlock; the work dir goes too if this run created it and
        left nothing else in it (a run refused before writing anything changes nothing)."""
        if self._fd < 0:
            return
        self._stop.set()
        self._heartbeat.join()
        self.path.unlink(missing_ok=True)  # while still locked: no other run holds this inode
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1
        if self._created_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # the run wrote something there: keep it
                pass

    def __enter__(self) -> WorkDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_work_dir(work_dir: str | os.PathLike) -> WorkDirLock:
    """Take ``work_dir``'s lock, creating the directory if needed, or raise ``UserError``
    naming the run that holds it. A lock its holder left behind is taken over (one warning)."""
    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"work dir {work_dir} is a file, not a directory; pass --work-dir with a directory path")
    created_dir = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(_in_use(work_dir, holder, "holds its lock")) from None
        # The holder may have released (and unlinked) the file between our open and lock:
        # then we locked an orphan inode and must start again on the path's current file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = _read_holder(fd)
    took_over = None
    if holder:
        age = time.time() - os.fstat(fd).st_mtime
        if holder.get("host") != socket.gethostname() and age < OTHER_HOST_STALE_S:
            os.close(fd)  # closing drops a POSIX lock
            raise UserError(_in_use(work_dir, holder, f"was alive {age:.0f} s ago (another host's lock is taken over after "
                                                      f"{OTHER_HOST_STALE_S:.0f} s without a heartbeat)"))  # fmt: skip
        took_over = _describe(holder)
        logger.warning("work dir %s: taking over the lock of %s, which ended without releasing it", work_dir, took_over)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    return WorkDirLock(path, fd, created_dir, took_over)


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "started": "?"}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a run that is starting"
    return f"the run of PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


def _in_use(work_dir: Path, holder: dict | None, how: str) -> str:
    return (
        f"work dir {work_dir} is in use: {_describe(holder)} {how}; wait for it to end, or pass "
        "--work-dir with another directory"
    )
