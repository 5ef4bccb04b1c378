"""Writing a file so that readers see the old file or the new one, never half of one.

Every file hooktrain replaces in place (exported models, converted weights, ONNX graphs,
parquet shards, ``latest``, the run's ``recipe.yaml``, the logger's ``metrics.jsonl``) is
written to a temporary file in the same directory and renamed over its name
(``os.replace``, atomic on one file system)::

    with atomic_path(out, default_mode=True) as tmp:
        save_file(tensors, str(tmp))  # any writer that takes a path

    write_atomically(path, text, fsync=True)  # text or bytes

The temporary file is named ``.tmp-<name>.<pid>``: hidden, next to its target, distinct per
process (ranks may write the same file) and removed by ``checkpoints.clean_stale`` when a kill
leaves one in the checkpoints directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hooktrain.errors import disk_full

TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False, default_mode: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for the caller to write; when the block ends
    without an exception the file replaces ``path`` in one rename, else it is removed and
    ``path`` is left as it was. The parent directory is created if missing.

    ``fsync`` flushes the file to disk before the rename (a crash then cannot leave an empty
    file under the name); ``default_mode`` gives it the mode a plain ``open()`` would (for
    writers such as safetensors that create their files 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        yield tmp
        if default_mode:
            give_default_mode(tmp)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        full = disk_full(exc, path, fix="free some space and write it again (a training run: --resume continues from its last checkpoint)")
        if full is not None:
            raise full from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` (text or bytes) through :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def give_default_mode(file: str | os.PathLike) -> None:
    """Give ``file`` the mode a plain ``open()`` would (0666 less the umask). safetensors
    creates its files 0600, unlike every other file of a checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush the file or directory ``path`` (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
