"""The errors a user sees: each one line that names the problem and the fix.

``UserError`` (bad input, exit 2), ``RunError`` / ``NonFiniteLoss`` (a run that cannot go on),
``did_you_mean``, and the messages for pydantic validation errors: recipe sections and hook
options are both pydantic models, and a problem anywhere in them is reported as the full key
path the user writes (``data.train.batch_size``, ``hooks[0].wandb.project``) with the valid
keys of the mapping it sits in.
"""

from __future__ import annotations

import difflib
import errno
import os
import typing
from collections.abc import Iterable
from typing import Any, Literal

import pydantic
from pydantic import BaseModel


class UserError(Exception):
    """Bad input from the user: a recipe key, a file, a dataset column.

    The CLI prints the message as one line and exits with code 2, without a traceback.
    The message must name the problem and the fix.
    """

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RunError(Exception):
    """A run that cannot go on: a non-finite loss, ranks out of step, a lost rank.

    The CLI prints the message as one line, without a traceback, and exits with
    ``exit_code``. When every rank raises the same agreed error, only the main process prints
    it; ``per_rank`` errors describe what one rank saw, and every rank prints its own.
    """

    exit_code = 1
    per_rank = False


class NonFiniteLoss(RunError):
    """A loss term or the gradient norm was NaN or infinite (``train.on_nonfinite``)."""

    exit_code = 3


class SourceOutage(RunError):
    """The data's server (the Hub) failed for longer than ``data.retry_budget_s``
    (:mod:`hooktrain.data.retry`). The run saves its last whole iteration and exits with 75,
    sysexits' ``EX_TEMPFAIL``: a requeue script should try again later."""

    exit_code = 75


class DiskFull(RunError):
    """A file of the run could not be written for want of space (:func:`disk_full`)."""

    per_rank = True


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
NEARLY_FULL_BYTES = 1 << 20  # less than this free after a failed write: the write ran out of space


RESUME_WHEN_FREE = "earlier checkpoints are whole; free some space, then --resume continues from the last checkpoint"


def disk_full(
    exc: BaseException,
    path: str | os.PathLike | None = None,
    *,
    what: str = "a file",
    near: str | os.PathLike | None = None,
    fix: str = RESUME_WHEN_FREE,
) -> DiskFull | None:
    """``exc`` as a one-line :class:`DiskFull` when it (or its cause) is a write that ran out of
    space, else None. The message names the file (``path``, else the one the ``OSError``
    names) and the file system it is on (``near`` when no file is known). Some writers do not
    say they ran out of space (torch's zip writer fails with ``unexpected pos``): then less
    than :data:`NEARLY_FULL_BYTES` left where the file goes decides."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = any(
        (isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(t in str(e) for t in _FULL_TEXTS) for e in chain
    )
    if path is None:
        path = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
    usage = _usage(path or near)
    if not said and (usage is None or usage.free >= NEARLY_FULL_BYTES):
        return None
    disk = "its disk"
    if usage is not None:
        disk = f"{mount_point(path or near)} ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB)"
    target = f"{what} {path}" if path else what
    return DiskFull(f"no space left on {disk}: {target} could not be written; nothing partial is left under its name; {fix}")


def _usage(path):
    import shutil

    if path is None:
        return None
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path)
    except OSError:
        return None


def mount_point(path) -> str:
    """The file system ``path`` is on, for messages: ``the file system at /mnt/x``."""
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return f"the file system at {path}"


# -- pydantic errors as one line naming the key path ----------------------------------------


def key_path(parts: list[str | int]) -> str:
    """``['hooks', 0, 'interval']`` -> ``hooks[0].interval`` (the spelling --cfg-options takes)."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes an annotation may hold (through Optional, Union, list, dict)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin is None:
        return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _tag_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("type")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if typing.get_origin(field.annotation) is Literal and len(args) == 1 else field.default


def locate(root: type[BaseModel], data: Any, loc: tuple) -> tuple[list[str | int], list[str]]:
    """Follow a pydantic error location through the user's input.

    Returns the key path as the user writes it (pydantic's union-member names dropped) and
    the valid keys of the mapping the last part belongs to.
    """
    candidates: list[type[BaseModel]] = [root]
    path: list[str | int] = []
    node = data
    for part in loc:
        fields = [model for model in candidates if part in model.model_fields]
        if isinstance(node, list) and isinstance(part, int):
            node = node[part] if 0 <= part < len(node) else None
            path.append(part)
        elif fields:
            node = node.get(part) if isinstance(node, dict) else None
            path.append(part)
            candidates = [c for model in fields for c in _models_in(model.model_fields[part].annotation)]
        else:
            # A discriminator tag (pydantic inserts the union member's name): pick that member.
            candidates = [c for c in candidates if _tag_of(c) == part] or candidates
        if isinstance(node, dict) and "type" in node:
            candidates = [c for c in candidates if _tag_of(c) == node["type"]] or candidates
    valid = sorted({name for model in candidates for name in model.model_fields})
    return path, valid


def describe(exc: pydantic.ValidationError, root: type[BaseModel], data: Any, *,
             noun: str = "recipe key", prefix: list[str | int] | None = None) -> str:  # fmt: skip
    """The first problem of ``exc`` (unknown keys first: they are usually the cause of the
    rest) as one line, with a count of the others."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        path, valid = locate(root, data, loc[:-1])
        full = key_path([*(prefix or []), *path, loc[-1]])
        key = str(loc[-1])
        return f"unknown {noun} '{full}'{did_you_mean(key, valid)}; valid keys here: {', '.join(valid)}{more}"
    path, _ = locate(root, data, loc)
    full = key_path([*(prefix or []), *path]) or "<recipe>"
    if error["type"] == "missing":
        return f"{noun} '{full}' is required but missing{more}"
    got = error.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return f"{noun} '{full}': {error['msg']} (got {shown}){more}"
