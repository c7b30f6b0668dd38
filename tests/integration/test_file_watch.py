"""The services file is watched with inotify: an edit, a rename over it and a
ConfigMap-style symlink swap are seen at once (the poll here is 30 s, so only
inotify can be that quick); a file held open is read once, when closed; and
without inotify the source polls as before."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest

from tests.integration.apphelpers import running
from tests.integration.test_file_reload import TWO_SERVICES, RecordingSink, describe
from uproxy.sources.file import FileSource

SLOW_POLL = 30.0  # anything seen within WAIT came through inotify
WAIT = 3.0


def start(path: Path, **kw: float) -> tuple[FileSource, RecordingSink]:
    settings = {"poll_interval": SLOW_POLL, "safety_interval": SLOW_POLL, **kw}
    source = FileSource(path, **settings)
    source.load_initial()
    return source, RecordingSink()


async def settled(source: FileSource, sink: RecordingSink) -> None:
    await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
    assert source._watch.active, source._watch.inotify_failure
    sink.take()


async def test_an_edit_in_place_is_seen_at_once(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(TWO_SERVICES)
    source, sink = start(path)
    async with running(source, sink):
        await settled(source, sink)
        path.write_text(TWO_SERVICES.replace("port: 80,", "port: 81,"))
        await sink.wait_until(lambda: bool(sink.events), WAIT)
    assert sink.summary() == ["service ~ default/web"]


async def test_a_file_held_open_is_read_once_when_it_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(TWO_SERVICES)
    source, sink = start(path)
    async with running(source, sink):
        await settled(source, sink)
        whole = TWO_SERVICES.replace("port: 53,", "port: 54,")
        with path.open("w") as writing:
            writing.write(whole[: len(whole) // 2])
            writing.flush()
            await asyncio.sleep(0.3)
            assert sink.events == []  # a half-written file is not read
            writing.write(whole[len(whole) // 2:])
        await sink.wait_until(lambda: bool(sink.events), WAIT)
    assert sink.summary() == ["service ~ default/dns"]


async def test_a_configmap_update_is_seen_at_once(tmp_path: Path) -> None:
    """What the kubelet does to a mounted ConfigMap: the file is a symlink through
    `..data`, and an update swaps `..data` to a new folder in one rename."""
    (tmp_path / "..2026_12_04_1").mkdir()
    (tmp_path / "..2026_12_04_1" / "services.yaml").write_text(TWO_SERVICES)
    os.symlink("..2026_12_04_1", tmp_path / "..data")
    os.symlink("..data/services.yaml", tmp_path / "services.yaml")
    source, sink = start(tmp_path / "services.yaml")
    async with running(source, sink):
        await settled(source, sink)
        (tmp_path / "..2026_12_04_2").mkdir()
        (tmp_path / "..2026_12_04_2" / "services.yaml").write_text(
            TWO_SERVICES.replace("port: 80,", "port: 82,"))
        os.symlink("..2026_12_04_2", tmp_path / "..data_tmp")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        await sink.wait_until(lambda: bool(sink.events), WAIT)
    assert [describe(e) for e in sink.events] == ["service ~ default/web"]


async def test_without_inotify_the_file_is_polled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "uproxy.sources.watch")
    monkeypatch.setitem(sys.modules, "asyncinotify", None)  # import fails
    path = tmp_path / "services.yaml"
    path.write_text(TWO_SERVICES)
    source, sink = start(path, poll_interval=0.05, debounce=0.05)
    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
        sink.take()
        assert not source._watch.active
        path.write_text(TWO_SERVICES.replace("port: 80,", "port: 83,"))
        await sink.wait_until(lambda: bool(sink.events), WAIT)
    assert sink.summary() == ["service ~ default/web"]
    assert any("no inotify" in r.getMessage() and "checking every 0.05 s" in r.getMessage()
               for r in caplog.records)


class _CountingInotify:
    """A real Inotify whose `get` calls are counted (one: no settling wait)."""

    def __init__(self, inotify: object) -> None:
        self.inotify = inotify
        self.gets = 0

    async def get(self) -> object:
        self.gets += 1
        return await self.inotify.get()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.inotify.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
async def test_a_single_file_written_whole_wakes_without_settling(
        tmp_path: Path, folder: bool) -> None:
    """A services file renamed into place is whole: the watch returns on that
    event. A folder may be mid-rewrite, so its events settle first."""
    from uproxy.sources.watch import Watch

    conf, stage = tmp_path / "conf", tmp_path / "stage"
    conf.mkdir()
    stage.mkdir()
    target = conf / "services.yaml"
    target.write_text(TWO_SERVICES)
    watch = Watch(conf if folder else target, poll_interval=SLOW_POLL)
    watch.start()
    assert watch.active, watch.inotify_failure
    counting = _CountingInotify(watch._inotify)
    watch._inotify = counting  # type: ignore[assignment]
    try:
        waiting = asyncio.ensure_future(watch.wait(WAIT))
        await asyncio.sleep(0)
        fresh = stage / "services.yaml"  # written outside the watched folder
        fresh.write_text(TWO_SERVICES)
        os.replace(fresh, target)
        assert await asyncio.wait_for(waiting, WAIT + 1) is True
        # The rename is the only event: a folder waits one more SETTLE for others.
        assert counting.gets == (2 if folder else 1)
    finally:
        watch.close()
