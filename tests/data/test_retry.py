"""``hooktrain.data.retry``: which failures are retried, where a read goes on, and the budget.

The end-to-end runs through a failing Hub stand-in are in ``test_hub_faults.py``; these check the
retry loop itself on readers that fail with the client libraries' own exception types.
"""

from __future__ import annotations

import logging
import re
import time

import pytest
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

from hooktrain.data import retry
from hooktrain.data.retry import Retries, failed_request, is_transient
from hooktrain.errors import SourceOutage

# The HTTP client huggingface_hub uses (httpx2 since 2.x, httpx before), and its exceptions.
httpx2 = getattr(_http, "httpx2", None) or _http.httpx
URL = "http://127.0.0.1:9/datasets/acme/ade/resolve/abc/train/0000.parquet"


@pytest.fixture
def records(monkeypatch):
    """What the retries log (caught on their own logger: the run's "hooktrain" logger does not
    propagate), with short waits."""
    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0.05)
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append
    logger = logging.getLogger("hooktrain.data.retry")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield caught
    logger.removeHandler(handler)
    logger.setLevel(level)


def http_error(status: int) -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("GET", URL))
    return HfHubHTTPError(f"Server error '{status}' for url '{URL}'", response=response)


def caused(outer: Exception, cause: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (http_error(500), True),
        (http_error(503), True),
        (http_error(429), True),
        (http_error(404), False),
        (http_error(401), False),
        (httpx2.ConnectError("[Errno 111] Connection refused"), True),
        (httpx2.RemoteProtocolError("peer closed connection without sending complete message body"), True),
        (httpx2.ReadTimeout("timed out"), True),
        (caused(ConnectionError("Server Disconnected"), http_error(503)), True),  # datasets' read retry
        (caused(RuntimeError("reading the shard"), ConnectionResetError(104, "reset")), True),
        (ValueError("not a parquet file"), False),
        (OSError("Couldn't deserialize thrift"), False),
    ],
)
def test_what_is_retried(error, transient):
    assert is_transient(error) is transient


def test_the_failed_request_is_named_once():
    said = failed_request(caused(ConnectionError("Server Disconnected"), http_error(503)))
    assert said == f"GET {URL}: Server error '503'"
    assert failed_request(httpx2.ConnectError("refused")) == "refused"  # no request known


class FlakyReader:
    """Items 0..n-1, opened at any position; the opens listed in ``fail_at`` fail with
    ``error`` once their reading reaches that position."""

    def __init__(self, n: int, fail_at: dict[int, list[Exception]]):
        self.n, self.fail_at, self.opened = n, fail_at, []

    def __call__(self, position: int):
        self.opened.append(position)
        for i in range(position, self.n):
            if self.fail_at.get(i):
                raise self.fail_at[i].pop(0)
            yield i + 1, f"item {i}"


def test_a_failed_read_goes_on_at_the_next_item_and_each_outage_is_announced_once(records):
    reader = FlakyReader(10, {4: [http_error(503), http_error(503)], 7: [ConnectionResetError(104, "reset")]})
    retries = Retries(30, "data.train.source", endpoint="http://127.0.0.1:9")
    items = [item for _, item in retries.read(reader)]
    assert items == [f"item {i}" for i in range(10)]
    assert reader.opened == [0, 4, 4, 7]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # two outages: 4 (two failed attempts), then 7
    assert warnings[0].startswith("data.train.source: the Hub at http://127.0.0.1:9 failed (GET " + URL)
    back = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(back) == 2 and all("answers again after" in line for line in back)


def test_an_outage_longer_than_the_budget_ends_in_one_line(records):
    endless = {i: [http_error(503)] * 1000 for i in range(3)}
    retries = Retries(1.5, "data.val.source", endpoint="http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(SourceOutage) as raised:
        list(retries.read(FlakyReader(3, endless)))
    assert 1.5 <= time.monotonic() - start < 3
    message = str(raised.value)
    assert re.fullmatch(r"data\.val\.source: the Hub at http://127\.0\.0\.1:9 failed for \d+ s, longer than "
                        rf"data\.retry_budget_s=1\.5 \(GET {re.escape(URL)}: Server error '503'\)", message)  # fmt: skip
    assert SourceOutage.exit_code == 75 and "\n" not in message
    assert len(records) == 1


def test_other_failures_are_not_retried():
    reader = FlakyReader(5, {2: [ValueError("not a parquet file")]})
    with pytest.raises(ValueError, match="not a parquet file"):
        list(Retries(30, "data.train.source").read(reader))
    assert reader.opened == [0]


def test_call_repeats_a_function_that_failed_on_the_network(records):
    failures = [httpx2.ConnectError("refused")]

    def open_source():
        if failures:
            raise failures.pop()
        return "dataset"

    assert Retries(30, "data.train.source").call(open_source) == "dataset"
