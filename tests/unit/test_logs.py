"""Logs: one line per event in text or JSON, and an access log a flood cannot blow up."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from uproxy.logs import ACCESS_LOGGER, AccessLog, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger(ACCESS_LOGGER).level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(ACCESS_LOGGER).setLevel(access_level)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_carry_ts_level_logger_msg_and_fields(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", 0, stream=out)

    logging.getLogger("uproxy.proxier").info(
        "rules applied", extra={"backend": "iptables", "rules": 12, "seconds": 0.004})
    logging.getLogger("uproxy.sources.file").warning("bad services file:\nline 3")

    first, second = (json.loads(line) for line in lines(out))
    assert set(first) == {"ts", "level", "logger", "msg", "backend", "rules", "seconds"}
    assert first["level"] == "info" and first["logger"] == "uproxy.proxier"
    assert first["msg"] == "rules applied"
    assert (first["backend"], first["rules"], first["seconds"]) == ("iptables", 12, 0.004)
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert second["level"] == "warning" and second["msg"] == "bad services file:\nline 3"


def test_text_lines_are_single_lines_with_key_values(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("text", 0, stream=out)

    logging.getLogger("uproxy.proxier").info(
        "service added", extra={"service": "default/web", "ports": 2, "note": "two words"})
    logging.getLogger("uproxy.x").error("multi\nline")
    logging.getLogger("uproxy.x").debug("hidden at verbosity 0")

    added, error = lines(out)
    assert "INFO" in added and "uproxy.proxier: service added" in added
    assert added.endswith('service=default/web ports=2 note="two words"')
    assert error.endswith("uproxy.x: multi\\nline")


def test_exceptions_stay_on_one_json_line(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", 0, stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("uproxy.app").exception("sync failed")
    (line,) = lines(out)
    record = json.loads(line)
    assert record["msg"] == "sync failed" and "RuntimeError: boom" in record["exc"]


def test_unknown_format_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^--log-format xml: expected text or json$"):
        setup_logging("xml", 0)  # type: ignore[arg-type]


def test_access_lines_need_verbose(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", 0, stream=out)
    access = AccessLog()
    access({"client": "127.0.0.1:5000", "service": "default/web:http"})
    assert not access.enabled and lines(out) == []

    setup_logging("json", 1, stream=out)
    record = {"client": "127.0.0.1:5000", "service": "default/web:http",
              "endpoint": "127.0.0.2:8080", "bytes_in": 10, "bytes_out": 20,
              "duration": 0.5, "reason": "eof", "name": "clashes with LogRecord.name"}
    access(record)
    (line,) = lines(out)
    parsed = json.loads(line)
    assert parsed["logger"] == ACCESS_LOGGER and parsed["msg"] == "access"
    assert {k: parsed[k] for k in ("client", "service", "endpoint", "bytes_in", "bytes_out",
                                   "duration", "reason")} == {
        k: v for k, v in record.items() if k != "name"}
    assert parsed["name_"] == "clashes with LogRecord.name"


def test_access_flood_is_rate_limited_and_reported(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", 1, stream=out)
    clock = Clock()
    access = AccessLog(rate=5, burst=5, report_every=10, clock=clock)

    for i in range(1000):  # a burst at one instant: only the bucket's 5 pass
        access({"client": f"127.0.0.{i % 250}:1", "bytes_in": i})
    assert len(lines(out)) == 5
    assert access.suppressed == 995

    clock.now += 10  # refills the bucket and the report is due
    access({"client": "127.0.0.1:2"})
    report, line = (json.loads(x) for x in lines(out)[5:])
    assert report["msg"] == "995 access log lines suppressed (over 5/s)"
    assert report["level"] == "warning" and report["suppressed"] == 995
    assert line["client"] == "127.0.0.1:2"
    assert access.suppressed == 0 and access.suppressed_total == 995

    clock.now += 0.2  # the bucket is full again (4 left + 1 refilled)
    for _ in range(7):
        access({"client": "127.0.0.1:3"})
    access.flush()  # at shutdown: report what is pending without waiting 10 s
    tail = [json.loads(x)["msg"] for x in lines(out)[7:]]
    assert tail == ["access"] * 5 + ["2 access log lines suppressed (over 5/s)"]

async def test_access_reporter_tells_the_count_after_the_flood_stops(
    restore_logging: None,
) -> None:
    out = io.StringIO()
    setup_logging("json", 1, stream=out)
    access = AccessLog(rate=1, burst=1, report_every=0.05)
    for _ in range(30):
        access({"client": "127.0.0.1:1"})
    reporter = asyncio.create_task(access.run())
    try:
        for _ in range(100):  # at most 2 s
            if access.suppressed == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        reporter.cancel()
    messages = [json.loads(line)["msg"] for line in lines(out)]
    assert messages == ["access", "29 access log lines suppressed (over 1/s)"]


def test_access_log_cost_per_line_is_small(restore_logging: None) -> None:
    """Suppressed calls are what a flood costs: they must be cheap."""
    setup_logging("json", 1, stream=io.StringIO())
    access = AccessLog(rate=1, burst=1)
    record = {"client": "127.0.0.1:1", "service": "default/web:http", "bytes_in": 1}
    start = time.perf_counter()
    for _ in range(20_000):
        access(record)
    per_call = (time.perf_counter() - start) / 20_000
    assert access.suppressed_total >= 19_990
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} µs per suppressed access line"
