"""The next iteration's batches, fetched while this one runs, so a data outage stops every rank
after the same whole iteration.

When the data's server has failed for longer than ``data.retry_budget_s``
(:mod:`hooktrain.data.retry`), a rank cannot start the next iteration. Were it to find out at
the start of that iteration, the other ranks would already wait for it in DDP's collectives.
So each rank fetches the next iteration's batches before the per-iteration agreement
(:mod:`hooktrain.engine.agreement`), which then tells every rank whether one lacks them; the
stream's saved position stays before them (``TrainStream.fetch_ahead``), so the checkpoint of
the finished iteration resumes exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from hooktrain.errors import SourceOutage


class Lookahead:
    """Fetches ``micro_batches`` batches of ``stream`` ahead (streams without ``fetch_ahead``,
    such as a benchmark's in-memory batches, are left alone). ``seconds`` adds up the time
    spent fetching; the runner counts it as data time."""

    def __init__(self, accelerator: Accelerator, stream: Any, micro_batches: int) -> None:
        self.accelerator = accelerator
        self.micro_batches = micro_batches
        self._fetch_ahead = getattr(stream, "fetch_ahead", None)
        self.started = False
        self.seconds = 0.0

    def first(self) -> None:
        """Fetch this process's first batches; with several processes the ranks agree that
        every one has them. Raises ``SourceOutage`` on every rank when one has not: nothing
        was trained yet, so nothing is saved."""
        self.started = True
        if self._fetch_ahead is None:
            return
        rng = torch.get_rng_state()  # starting the DataLoader draws from it (rng_neutral_start)
        message = self.agreed_failure(self._fetch())
        torch.set_rng_state(rng)
        if message is not None:
            raise SourceOutage(f"{message}; nothing was trained since the run started: start it "
                               "again (with --resume) once the server answers")  # fmt: skip

    def next(self, *, last: bool) -> SourceOutage | None:
        """Fetch the next iteration's batches (none after the ``last`` iteration); the failure
        that stopped the fetch, if one did."""
        return None if self._fetch_ahead is None or last else self._fetch()

    def agreed_failure(self, failure: SourceOutage | None) -> str | None:
        """The message of the first rank whose fetch failed, on every rank, or None."""
        messages = [None if failure is None else str(failure)]
        if self.accelerator.num_processes > 1:
            messages = gather_object(messages)
        return next((m for m in messages if m is not None), None)

    def stop_after(self, iteration: int, failure: SourceOutage | None) -> SourceOutage:
        """The error that ends the run after ``iteration``, the agreement having found a rank
        without the next batches (every rank calls it: it gathers that rank's message)."""
        return SourceOutage(f"{self.agreed_failure(failure)}; {_stopped_after(iteration)}")

    def _fetch(self) -> SourceOutage | None:
        start = time.perf_counter()
        failure = self._fetch_ahead(self.micro_batches)
        self.seconds += time.perf_counter() - start
        return failure


def outage_after_whole_iteration(
    exc: BaseException, accelerator: Accelerator, iteration_open: bool, iteration: int
) -> SourceOutage | None:
    """For ``exc`` that ended the loop: the error to raise once the hooks have saved
    ``iteration``, when ``exc`` is a single process's data outage between train steps (in an
    evaluation): the iteration is whole, so it is saved as for SIGTERM. Else None. With several
    processes the others wait in the evaluation's collectives, so it stays an error of this
    rank alone (it prints it, and the rank watch tells the others)."""
    if not isinstance(exc, SourceOutage) or iteration_open:
        return None
    if accelerator.num_processes > 1:
        exc.per_rank = True
        return None
    return SourceOutage(f"{exc}; {_stopped_after(iteration)}")


def _stopped_after(iteration: int) -> str:
    return (f"stopped after iteration {iteration}, which the checkpoint hook saves; --resume "
            "continues exactly once the server answers")  # fmt: skip


def rng_neutral_start(batches: Iterator[dict[str, torch.Tensor]]):
    """``batches``, but the first ``next`` leaves torch's global RNG as it found it.

    Starting a DataLoader iterator draws its base seed from the global RNG; a resumed run
    would draw again and shift every later dropout mask against the run that wrote the
    checkpoint, so resume would not be exact. (:meth:`Lookahead.first` does the same for
    streams that fetch ahead, in every run; this covers other iterators of batches.)
    """
    state = torch.get_rng_state()
    first = next(batches)
    torch.set_rng_state(state)
    yield first
    yield from batches
