"""The collector pause: nested and overlapping pauses enable it once, at the end."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from uproxy.heap import FREEZE_AFTER, collector_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_a_pause_disables_the_collector_and_enables_it_after() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_pauses_end_when_the_last_one_does() -> None:
    gc.enable()
    inner_started, outer_done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other_thread() -> None:
        with collector_paused():
            inner_started.set()
            assert outer_done.wait(10)
            seen.append(gc.isenabled())  # the first pause ended; this one still holds
        seen.append(gc.isenabled())

    thread = threading.Thread(target=other_thread)
    with collector_paused():
        thread.start()
        assert inner_started.wait(10)
    outer_done.set()
    thread.join(10)
    assert seen == [False, True]


def test_an_exception_still_ends_the_pause() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_disabled_by_someone_else_stays_disabled() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.collect()
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_a_pause_that_made_bulk_objects_freezes_them() -> None:
    gc.enable()
    before = gc.get_freeze_count()
    with collector_paused():
        kept = [[i] for i in range(FREEZE_AFTER + 1000)]
    assert gc.get_freeze_count() >= before + len(kept)
    assert gc.isenabled()


@pytest.mark.usefixtures("unfrozen")
def test_a_small_pause_freezes_nothing() -> None:
    gc.enable()
    with collector_paused():
        kept = [[i] for i in range(100)]
    assert len(kept) == 100
    assert gc.get_freeze_count() == 0
