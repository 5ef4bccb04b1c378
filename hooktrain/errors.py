"""The one exception type for bad user input."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
