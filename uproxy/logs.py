"""Logging: one line per event, as text or JSON, and a rate-limited access log.

Events carry their fields as `extra={...}`; both formats print them (text as
`key=value` after the message, JSON as top-level keys), so a line stays one
line and scripts can read either. Per-connection access lines go through
`AccessLog`, a token bucket, so a connection flood cannot fill a disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
ACCESS_LOGGER = "uproxy.access"

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...extra fields} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TS LEVEL logger: msg key=value ...` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"{record.levelname:<7}", f"{record.name}:",
                 record.getMessage()]
        for key, value in _extras(record).items():
            shown = value if isinstance(value, int | float) else str(value)
            if isinstance(shown, str) and (not shown or " " in shown or '"' in shown):
                shown = json.dumps(shown, ensure_ascii=False)
            parts.append(f"{key}={shown}")
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        return _one_line(" ".join(str(p) for p in parts))


def setup_logging(fmt: LogFormat = "text", verbose: int = 0,
                  stream: TextIO | None = None) -> logging.Handler:
    """Route every log line to `stream` (stderr) in the chosen format.

    verbose 0: info and up, no access lines; 1 (-v): plus access lines;
    2 (-vv): debug. Returns the installed handler (tests read through it).
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format {fmt}: expected text or json")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_uproxy", False):
            root.removeHandler(old)
    handler._uproxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if verbose >= 1 else logging.WARNING)
    # aiohttp logs every request at info; our servers are scraped every few seconds.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


class AccessLog:
    """Per-connection access lines, at most `rate` per second (burst `burst`).

    The relay calls it with one dict per closed connection (client, service,
    endpoint, bytes_in, bytes_out, duration, reason). Lines over the budget
    are counted, and at most every `report_every` seconds one line says how
    many were suppressed.
    """

    def __init__(
        self,
        rate: float = 100.0,
        burst: float = 100.0,
        report_every: float = 10.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._report_every = report_every
        self._logger = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        self._clock = clock
        self._tokens = burst
        self._refilled = clock()
        self._reported = self._refilled
        self.suppressed = 0  # since the last suppression line
        self.suppressed_total = 0

    @property
    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def __call__(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self._maybe_report(now)
            extra = {(f"{k}_" if k in _RECORD_ATTRS else k): v for k, v in record.items()}
            self._logger.info("access", extra=extra)
            return
        self.suppressed += 1
        self.suppressed_total += 1
        self._maybe_report(now)

    async def run(self) -> None:
        """Report suppressed lines every `report_every` seconds until cancelled,
        so the count is told even when the flood stops."""
        while True:
            await asyncio.sleep(self._report_every)
            self.flush()

    def flush(self) -> None:
        """Report suppressed lines now (call periodically and at shutdown)."""
        self._maybe_report(self._clock(), force=True)

    def _maybe_report(self, now: float, force: bool = False) -> None:
        if not self.suppressed or (not force and now - self._reported < self._report_every):
            return
        self._logger.warning(
            "%d access log lines suppressed (over %g/s)", self.suppressed, self._rate,
            extra={"suppressed": self.suppressed},
        )
        self.suppressed = 0
        self._reported = now
