"""SyncRunner timelines: a fake clock that only moves when the test says so,
plus one test on the real loop clock with short intervals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from uproxy.runner import SyncRunner


class FakeTime:
    """A clock and a sleep; sleepers wake only when `advance` passes their deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        for _ in range(10_000):  # bounded: every step wakes at least one sleeper
            await settle()
            due = [t for t, f in self._sleepers if t <= target and not f.done()]
            if not due:
                break
            self.now = max(self.now, min(due))
            for t, f in self._sleepers:
                if t <= self.now and not f.done():
                    f.set_result(None)
        self.now = target
        await settle()


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(50):
        await asyncio.sleep(0)


class Recorder:
    """A sync function that records when it ran and can fail or block on demand."""

    def __init__(self, time: FakeTime | None = None) -> None:
        self.time = time
        self.starts: list[float] = []
        self.active = 0
        self.max_active = 0
        self.fail_next = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> None:
        self.starts.append(self.time.now if self.time else asyncio.get_running_loop().time())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("iptables-restore: exit status 4")
        finally:
            self.active -= 1


Started = Callable[..., Awaitable[tuple[SyncRunner, Recorder]]]


@pytest.fixture
async def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def started(fake: FakeTime) -> AsyncIterator[Started]:
    tasks: list[asyncio.Task[None]] = []

    async def start(
        min_interval: float, max_interval: float, retry_base: float = 1.0
    ) -> tuple[SyncRunner, Recorder]:
        recorder = Recorder(fake)
        runner = SyncRunner(
            recorder,
            min_interval,
            max_interval,
            clock=fake.clock,
            sleep=fake.sleep,
            retry_base=retry_base,
        )
        tasks.append(asyncio.create_task(runner.run()))
        await settle()
        return runner, recorder

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_nothing_runs_before_a_request_or_the_period(started: Started) -> None:
    runner, sync = await started(1.0, 60.0)
    await settle()
    assert sync.starts == []
    assert runner.syncs == 0
    assert runner.last_success is None


async def test_a_burst_of_requests_is_at_most_two_syncs(
    started: Started, fake: FakeTime
) -> None:
    runner, sync = await started(1.0, 60.0)
    for _ in range(100):
        runner.request()
        await asyncio.sleep(0)
    await fake.advance(0.5)
    assert sync.starts == [0.0]  # the first request runs at once
    assert runner.pending  # the rest wait for min_interval
    await fake.advance(10.0)
    assert sync.starts == [0.0, 1.0]
    assert runner.syncs == 2
    assert not runner.pending


async def test_requests_never_sync_more_often_than_min_interval(
    started: Started, fake: FakeTime
) -> None:
    runner, sync = await started(2.0, 60.0)
    for _ in range(40):  # a request every 0.25 s for 10 s
        runner.request()
        await fake.advance(0.25)
    gaps = [b - a for a, b in zip(sync.starts, sync.starts[1:], strict=False)]
    assert sync.starts == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert all(gap >= 2.0 for gap in gaps)


async def test_a_request_after_a_quiet_spell_runs_at_once(
    started: Started, fake: FakeTime
) -> None:
    runner, sync = await started(1.0, 60.0)
    runner.request()
    await fake.advance(5.0)
    runner.request()
    await settle()
    assert sync.starts == [0.0, 5.0]


async def test_periodic_sync_without_requests(started: Started, fake: FakeTime) -> None:
    runner, sync = await started(1.0, 30.0)
    await fake.advance(29.0)
    assert sync.starts == []
    await fake.advance(1.0)
    assert sync.starts == [30.0]
    await fake.advance(30.0)
    assert sync.starts == [30.0, 60.0]
    assert runner.last_success == 60.0


async def test_a_requested_sync_postpones_the_periodic_one(
    started: Started, fake: FakeTime
) -> None:
    runner, sync = await started(1.0, 30.0)
    await fake.advance(20.0)
    runner.request()
    await fake.advance(29.0)  # t=49: periodic is due at 20 + 30
    assert sync.starts == [20.0]
    await fake.advance(1.0)
    assert sync.starts == [20.0, 50.0]
    assert runner.syncs == 2


async def test_syncs_never_overlap(started: Started, fake: FakeTime) -> None:
    runner, sync = await started(0.5, 60.0)
    sync.gate = asyncio.Event()
    runner.request()
    await settle()
    assert sync.active == 1
    for _ in range(10):  # requests while the sync is still running, time passing
        runner.request()
        await fake.advance(1.0)
    assert sync.starts == [0.0]
    assert runner.in_sync
    sync.gate.set()
    await settle()
    # The coalesced requests run as one more sync, right away (min_interval passed).
    assert sync.starts == [0.0, 10.0]
    assert sync.max_active == 1
    assert runner.syncs == 2


async def test_a_failed_sync_is_logged_and_retried_with_backoff(
    started: Started, fake: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    runner, sync = await started(0.5, 10.0, retry_base=1.0)
    sync.fail_next = 3
    with caplog.at_level(logging.ERROR, logger="uproxy.runner"):
        runner.request()
        await fake.advance(20.0)
    # Fails at 0, retried after 1, 2, 4 seconds; succeeds at 7; periodic at 17.
    assert sync.starts == [0.0, 1.0, 3.0, 7.0, 17.0]
    assert runner.failures == 3
    assert runner.consecutive_failures == 0
    assert runner.last_success == 17.0
    assert runner.last_error is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "exit status 4" in messages[0]
    assert "3 in a row" in messages[2]


async def test_backoff_is_capped_at_max_interval(started: Started, fake: FakeTime) -> None:
    runner, sync = await started(0.0, 5.0, retry_base=1.0)
    sync.fail_next = 1_000
    runner.request()
    await fake.advance(25.0)
    gaps = [b - a for a, b in zip(sync.starts, sync.starts[1:], strict=False)]
    assert gaps[:6] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert runner.last_success is None
    assert runner.last_error == "RuntimeError: iptables-restore: exit status 4"


async def test_a_request_during_backoff_still_runs_after_min_interval(
    started: Started, fake: FakeTime
) -> None:
    runner, sync = await started(1.0, 60.0, retry_base=8.0)
    sync.fail_next = 1
    runner.request()
    await fake.advance(0.25)
    runner.request()  # maybe the change that fixes it
    await fake.advance(5.0)
    assert sync.starts == [0.0, 1.0]
    assert runner.last_success == 1.0


async def test_run_is_single_and_stops_on_cancel() -> None:
    sync = Recorder()
    runner = SyncRunner(sync, 0.05, 10.0)
    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(runner.run())
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="already running"):
                await runner.run()
            runner.request()
            await asyncio.sleep(0.05)
            raise KeyboardInterruptLike()
    assert caught.group_contains(KeyboardInterruptLike)
    assert runner.syncs == 1
    # Cancelled with the group; a new run may start afterwards.
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class KeyboardInterruptLike(Exception):
    """Stands in for whatever makes the owner's TaskGroup end."""


async def test_real_clock_burst_and_period() -> None:
    sync = Recorder()
    runner = SyncRunner(sync, 0.1, 0.4)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0)
        t0 = loop.time()
        for _ in range(100):  # the first starts a sync, the other 99 wait for one more
            runner.request()
            await asyncio.sleep(0)
        await asyncio.sleep(0.25)
        assert len(sync.starts) == 2
        assert sync.starts[1] - sync.starts[0] >= 0.1 - 0.01
        await asyncio.sleep(0.5)  # idle: the periodic sync keeps running
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert 3 <= len(sync.starts) <= 4
    assert runner.last_success is not None
    assert sync.starts[0] - t0 < 0.05


def test_bad_intervals_are_rejected() -> None:
    async def nop() -> None:
        return None

    with pytest.raises(ValueError, match="max_interval"):
        SyncRunner(nop, 5.0, 1.0)
    with pytest.raises(ValueError, match="min_interval"):
        SyncRunner(nop, -1.0, 1.0)
    with pytest.raises(ValueError, match="max_interval"):
        SyncRunner(nop, 0.0, 0.0)
