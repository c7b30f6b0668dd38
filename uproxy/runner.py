"""Run the proxier's sync no more often than min_interval, at least every max_interval.

Modelled on kube-proxy's BoundedFrequencyRunner
(pkg/util/async/bounded_frequency_runner.go): `request()` asks for a sync
soon; requests that arrive while a sync runs, or before min_interval has
passed since the last sync started, are coalesced into one sync at the next
opportunity. A periodic sync runs at least every max_interval even when
nobody asks (it repairs rules someone else flushed). Syncs never overlap.

A sync that raises one of the `transient` errors (the app passes RulesError:
a rule tool refused, the kernel was busy) is logged in one line and retried
with exponential backoff (capped at max_interval); a request still runs a
sync as soon as min_interval allows, because the change it announces may be
the fix. Anything else is a bug: it ends `run()`, and with it the process,
whose shutdown removes the rules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("uproxy.runner")

Sync = Callable[[], Awaitable[None]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class SyncRunner:
    def __init__(
        self,
        sync: Sync,
        min_interval: float,
        max_interval: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        retry_base: float = 1.0,
        name: str = "sync",
        transient: tuple[type[Exception], ...] = (Exception,),
    ) -> None:
        if min_interval < 0:
            raise ValueError(f"{name}: min_interval must be >= 0, got {min_interval}")
        if not 0 < max_interval < float("inf"):
            raise ValueError(f"{name}: max_interval must be a positive finite number")
        if max_interval < min_interval:
            raise ValueError(
                f"{name}: max_interval ({max_interval}) must be >= min_interval ({min_interval})"
            )
        self._sync = sync
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock = clock
        self._sleep = sleep
        self._retry_base = max(retry_base, 1e-3)
        self.name = name
        self._transient = transient

        self._wake = asyncio.Event()
        self._requested = False
        self._running = False
        self._last_start: float | None = None
        self._periodic_due = 0.0
        self._retry_at: float | None = None

        self.syncs = 0  # syncs run, successful or not
        self.failures = 0  # syncs that raised
        self.consecutive_failures = 0
        self.last_success: float | None = None  # clock() when the last good sync ended
        self.last_error: str | None = None
        self.last_duration: float | None = None
        self.in_sync = False  # a sync is running right now

    def request(self) -> None:
        """Ask for a sync soon. Cheap; safe to call from any callback on the loop."""
        self._requested = True
        self._wake.set()

    @property
    def pending(self) -> bool:
        """A requested sync has not started yet."""
        return self._requested

    async def run(self) -> None:
        """Run syncs until cancelled (own it with a TaskGroup; cancel to stop)."""
        if self._running:
            raise RuntimeError(f"{self.name}: run() is already running")
        self._running = True
        try:
            self._periodic_due = self._clock() + self.max_interval
            while True:
                now = self._clock()
                due = self._next_due(now)
                if due > now:
                    self._wake.clear()
                    await self._wait(due - now)
                    continue
                await self._run_once()
        finally:
            self._running = False

    def _next_due(self, now: float) -> float:
        due = self._periodic_due
        if self._requested:
            due = min(due, self._earliest(now))
        if self._retry_at is not None:
            due = min(due, self._retry_at)
        return due

    def _earliest(self, now: float) -> float:
        if self._last_start is None:
            return now
        return max(now, self._last_start + self.min_interval)

    async def _wait(self, timeout: float) -> None:
        """Sleep until `timeout` passes or `request()` is called."""
        waker = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self._sleep(timeout))
        try:
            await asyncio.wait({waker, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            sleeper.cancel()

    async def _run_once(self) -> None:
        self._requested = False
        self._retry_at = None
        start = self._clock()
        self._last_start = start
        self._periodic_due = start + self.max_interval
        self.in_sync = True
        try:
            await self._sync()
        except self._transient as error:  # retried; anything else ends the loop
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            backoff = min(
                self._retry_base * 2 ** (self.consecutive_failures - 1), self.max_interval
            )
            self._retry_at = max(start + self.min_interval, self._clock() + backoff)
            log.error(
                "%s failed (%d in a row), retrying in %.3gs: %s",
                self.name, self.consecutive_failures, backoff, self.last_error,
            )
        else:
            self.consecutive_failures = 0
            self.last_error = None
            self.last_success = self._clock()
        finally:
            self.in_sync = False
            self.syncs += 1
            self.last_duration = self._clock() - start
