"""Riding out a network that fails: reads of a remote source retried with backoff, exactly.

Two layers retry a streamed Hub source:

- ``huggingface_hub`` retries each HTTP request itself: 5 more tries, 1 to 8 s apart (about
  23 s in all), on 429/5xx answers, refused or dropped connections and bodies cut short. A
  share of failing requests never gets past it. ``datasets``' own read and open retries
  (20 times 5 to 60 s on top, about 9.5 minutes) are turned down to one attempt
  (:func:`quiet_client_retries`): this layer replaces them.
- :class:`Retries` re-opens the shard where the failed read left off. A reader always knows
  the position of the next row it hands out, so after a failure it opens the shard at that
  row and goes on: the same rows in the same order, and a run that met an outage trains
  exactly as one that did not. It waits 1, 2, 4, ... up to 30 s between attempts, until the
  outage has lasted ``data.retry_budget_s``; then it raises :class:`SourceOutage` (exit code
  75), and the runner saves its last whole iteration first.

An outage is logged once per rank, not once per request: one warning when it begins (by
whichever of the rank's DataLoader workers meets it first), and an info line when the
server answers again. The first attempt that fails after the budget ends the outage, so the
longest wait is the budget plus one attempt's own retries (those ~23 s).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.sharedctypes
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from hooktrain.errors import SourceOutage, first_line

logger = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0
# Loggers that write one line per retried request; the outage is reported here instead.
_CHATTY_LOGGERS = ("huggingface_hub.utils._http", "datasets.utils.file_utils")
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "aiohttp", "requests", "urllib3")
_NETWORK_NAMES = ("Connect", "Timeout", "Protocol", "Network", "ReadError", "WriteError",
                  "Disconnected", "Payload", "ChunkedEncoding", "IncompleteRead")  # fmt: skip


def quiet_client_retries() -> None:
    """Leave the waiting to :class:`Retries`: one attempt per read or open in ``datasets``
    (``huggingface_hub``'s quick per-request retries stay) and no line per retried request.
    Called where the stream is built and again in each DataLoader worker."""
    import datasets

    config = datasets.config
    config.STREAMING_READ_MAX_RETRIES = config.STREAMING_OPEN_MAX_RETRIES = 1
    config.STREAMING_READ_RETRY_INTERVAL = config.STREAMING_OPEN_RETRY_INTERVAL = 0
    config.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = 0
    config.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = 0
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure of the network or the server that
    trying again may cure: a refused, dropped or timed-out connection, a body cut short, or
    a 408/425/429/5xx answer."""
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        status = _attribute(_attribute(e, "response"), "status_code")
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        if type(e).__module__.split(".")[0] in _NETWORK_MODULES and any(
            n in type(e).__name__ for n in _NETWORK_NAMES
        ):
            return True
    return False


def failed_request(exc: BaseException) -> str:
    """``"GET <url>: <what went wrong>"`` for the request behind ``exc``, as well as it can
    be told: the URL from the HTTP client's exception, else the first one a message names."""
    chain = _chain(exc)
    url = method = None
    for e in chain:
        request = _attribute(e, "request") or _attribute(_attribute(e, "response"), "request")
        if request is not None and _attribute(request, "url") is not None:
            url, method = str(request.url), _attribute(request, "method")
            break
    if url is None:
        found = next((m for e in chain if (m := re.search(r"https?://[^\s'\"]+", str(e)))), None)
        url = found[0] if found else None
    cause = re.sub(r"\s*for url '[^']*'", "", first_line(chain[-1]))
    if url is None:
        return cause
    return f"{method or 'GET'} {url}: {cause}"


def _attribute(obj, name: str):
    """``obj.name``, or None (httpx's ``.request`` raises RuntimeError when it was never set)."""
    try:
        return getattr(obj, name, None)
    except RuntimeError:
        return None


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


_failing: multiprocessing.sharedctypes.Synchronized | None = None


def _failing_readers():
    """The number of this rank's readers in an outage now, shared by all its sources (train
    and val) and DataLoader workers, so that one outage is announced once."""
    global _failing
    if _failing is None:
        _failing = multiprocessing.Value("i", 0)
    return _failing


class Retries:
    """The retry policy of one source's readers on one rank, shared by its DataLoader
    workers (built before they start; the count of failing readers lives in shared memory
    so that an outage is announced once, whichever source meets it)."""

    def __init__(self, budget_s: float, where: str, *, endpoint: str | None = None) -> None:
        self.budget_s = budget_s
        self.where = where  # the recipe key of the source, for messages
        self.endpoint = endpoint
        self._failing = _failing_readers()
        quiet_client_retries()

    def read(
        self, open_at: Callable[[int], Iterator[tuple[int, T]]], start: int = 0
    ) -> Iterator[tuple[int, T]]:
        """Yield what ``open_at(start)`` yields, re-opening it at the position of the last
        item yielded when it fails on the network. ``open_at(p)`` yields ``(position after
        this item, item)``: re-opened at that position it yields the items that came next."""
        position, outage_began, attempt_began, tries = start, None, time.monotonic(), 0
        while True:
            items = None
            try:
                items = open_at(position)
                for position, item in items:
                    if outage_began is not None:
                        self._end(outage_began)
                        outage_began, tries = None, 0
                    yield position, item
                    attempt_began = time.monotonic()
                return
            except Exception as exc:  # noqa: BLE001 - only network failures are retried
                if not is_transient(exc):
                    raise
                if outage_began is None:
                    outage_began = attempt_began
                    self._begin(exc)
                waited = time.monotonic() - outage_began
                if waited >= self.budget_s:  # the outage stays open: the run is ending
                    raise SourceOutage(self._outage_line(exc, waited)) from None
                time.sleep(min(FIRST_WAIT_S * 2**tries, MAX_WAIT_S, self.budget_s - waited))
                tries += 1
                attempt_began = time.monotonic()
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, called again when it fails on the network (it must be safe to repeat)."""
        for _, value in self.read(lambda _: iter([(0, fn())])):
            return value
        raise AssertionError("unreachable: read yields the one value or raises")

    @classmethod
    def for_source(cls, source, budget_s: float, where: str) -> Retries:
        """The retries of a recipe source: messages name the Hub's endpoint for Hub sources."""
        from huggingface_hub import constants

        from hooktrain.recipe.data import HubSource

        files = getattr(source, "data_files", None) or []
        files = [files] if isinstance(files, str) else files
        on_hub = isinstance(source, HubSource) or any(str(f).startswith("hf://") for f in files)
        return cls(budget_s, where, endpoint=constants.ENDPOINT if on_hub else None)

    def _server(self) -> str:
        return f"the Hub at {self.endpoint}" if self.endpoint else "the data's server"

    def _begin(self, exc: BaseException) -> None:
        with self._failing.get_lock():
            self._failing.value += 1
            first = self._failing.value == 1
        if first:
            logger.warning(
                "%s: %s failed (%s); retrying for up to %g s (data.retry_budget_s), then the run "
                "saves and exits with 75; it goes on exactly where it was",
                self.where, self._server(), failed_request(exc), self.budget_s,
            )  # fmt: skip

    def _end(self, began: float) -> None:
        with self._failing.get_lock():
            self._failing.value -= 1
            last = self._failing.value == 0
        if last:
            logger.info("%s: %s answers again after %.0f s; reading goes on where it was",
                        self.where, self._server(), time.monotonic() - began)  # fmt: skip

    def _outage_line(self, exc: BaseException, waited: float) -> str:
        return (
            f"{self.where}: {self._server()} failed for {waited:.0f} s, longer than "
            f"data.retry_budget_s={self.budget_s:g} ({failed_request(exc)})"
        )
