"""FileSource over real files and a real event loop: load, edit, break, fix, reload, delete."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.apphelpers import running
from uproxy.model import EndpointSlice, Service
from uproxy.sources.base import Source
from uproxy.sources.file import FileSource, SourceFileError

POLL = 0.05
DEBOUNCE = 0.1
WAIT = 5.0  # upper bound for anything to show up; the happy path takes well under 1 s

TWO_SERVICES = """\
services:
  - name: web
    ports: [{name: http, port: 80, targetPort: 8080}]
    endpoints: [127.0.0.1, 127.0.0.2]
  - name: dns
    ports: [{port: 53, protocol: UDP}]
    endpoints: ["127.0.0.1:5353"]
"""


@dataclass
class RecordingSink:
    """Keeps every call in order, and wakes waiters on each."""

    events: list[tuple[str, object, object]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _record(self, kind: str, previous: object, current: object) -> None:
        self.events.append((kind, previous, current))
        self.changed.set()

    def on_service(self, previous: Service | None, current: Service | None) -> None:
        self._record("service", previous, current)

    def on_slice(self, previous: EndpointSlice | None, current: EndpointSlice | None) -> None:
        self._record("slice", previous, current)

    def on_node(self, previous: object, current: object) -> None:
        self._record("node", previous, current)

    def on_synced(self, source: str) -> None:
        self._record("synced", source, None)

    def on_source_error(self, source: str, message: str) -> None:
        self._record("error", source, message)

    async def wait_until(self, done: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; events so far: {self.summary()}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def take(self) -> list[tuple[str, object, object]]:
        taken, self.events = self.events, []
        return taken

    def summary(self) -> list[str]:
        return [describe(event) for event in self.events]


def describe(event: tuple[str, object, object]) -> str:
    """('service', None, web) -> 'service + default/web'; changes '~', deletions '-'."""
    kind, previous, current = event
    if kind in ("synced", "error"):
        return f"{kind} {current if kind == 'error' else previous}"
    obj = current if current is not None else previous
    assert isinstance(obj, Service | EndpointSlice)
    sign = "+" if previous is None else "-" if current is None else "~"
    return f"{kind} {sign} {obj.key}"


def rewrite(path: Path, text: str) -> None:
    """Replace the file's content, as an editor that writes in place does."""
    path.write_text(text)


@pytest.fixture
def services_file(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(TWO_SERVICES)
    return path


def start(path: Path, *, poll_interval: float = POLL) -> tuple[FileSource, RecordingSink]:
    source = FileSource(path, debounce=DEBOUNCE, poll_interval=poll_interval)
    source.load_initial()
    return source, RecordingSink()


def test_file_source_satisfies_the_source_protocol(services_file: Path) -> None:
    source: Source = FileSource(services_file)

    assert source.name == "file"


async def test_initial_load_is_reported_then_synced(services_file: Path) -> None:
    source, sink = start(services_file)

    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))

    assert sink.summary() == [
        "service + default/dns", "service + default/web",
        "slice + default/dns-ipv4-5353", "slice + default/web-ipv4",
        "synced file",
    ]


async def test_edit_reports_only_the_difference(services_file: Path) -> None:
    source, sink = start(services_file)
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)  # let a racy re-load (if any) pass; it reports nothing
        sink.take()

        rewrite(services_file, TWO_SERVICES.replace("port: 80,", "port: 8000,"))
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(DEBOUNCE + 3 * POLL)  # anything else would show up by now

        events = sink.take()
    assert [describe(e) for e in events] == ["service ~ default/web"]
    _, previous, current = events[0]
    assert isinstance(previous, Service) and isinstance(current, Service)
    assert (previous.ports[0].port, current.ports[0].port) == (80, 8000)


async def test_bad_edit_reports_an_error_and_keeps_state_then_recovers(
    services_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, sink = start(services_file)
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        with caplog.at_level(logging.INFO, logger="uproxy.sources.file"):
            rewrite(services_file, TWO_SERVICES.replace("port: 53,", "port: domain,"))
            await sink.wait_until(lambda: bool(sink.events))
            await asyncio.sleep(DEBOUNCE + 3 * POLL)
            source.reload()  # SIGHUP: the same bad file is not reported again
            await sink.wait_until(lambda: "unchanged" in caplog.text)
            broken = sink.take()

            fixed = TWO_SERVICES.replace("127.0.0.1:5353", "127.0.0.1:5354")
            rewrite(services_file, fixed)
            await sink.wait_until(lambda: len(sink.events) >= 2)
            await asyncio.sleep(DEBOUNCE + 3 * POLL)
            recovered = sink.take()

    message = (f"{services_file}:6: services[1].ports[0].port: "
               "must be an integer 1-65535, got 'domain'")
    assert broken == [("error", "file", message)]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [message]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"services file {services_file} is unchanged and still not loaded (the error above); "
        "the last good state keeps serving",
        f"services file {services_file} loads again: default/dns changed",
    ]
    # the fix is compared with the last good state: only the dns slice moved
    assert [describe(e) for e in recovered] == [
        "slice - default/dns-ipv4-5353", "slice + default/dns-ipv4-5354",
    ]


async def test_empty_file_is_an_error_and_nothing_is_deleted(services_file: Path) -> None:
    source, sink = start(services_file)
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        rewrite(services_file, "")
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(DEBOUNCE + 3 * POLL)

        events = sink.take()
    assert events == [
        ("error", "file", f"{services_file}: empty file (write 'services: []' for no services)")
    ]


async def test_reload_picks_up_a_change_at_once(services_file: Path) -> None:
    source, sink = start(services_file, poll_interval=60.0)  # polling would not see it in time
    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
        sink.take()

        rewrite(services_file, TWO_SERVICES.replace("127.0.0.2", "127.0.0.3"))
        began = time.monotonic()
        source.reload()
        await sink.wait_until(lambda: bool(sink.events), timeout=2.0)
        took = time.monotonic() - began

        events = sink.take()
    assert [describe(e) for e in events] == ["slice ~ default/web-ipv4"]
    assert took < 1.0


def test_reload_lines_name_services_not_objects() -> None:
    from uproxy.model import ObjectName
    from uproxy.sources.file import describe_changes

    one_removed = {ObjectName("default", "db"): "removed"}
    assert describe_changes(one_removed) == "default/db removed"
    many = {ObjectName("ns", f"s{i}"): ("added" if i % 3 else "removed") for i in range(9)}
    assert describe_changes(many) == "6 services added, 3 services removed"


async def test_deleting_a_service_reports_it_and_its_slices(services_file: Path) -> None:
    source, sink = start(services_file)
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        rewrite(services_file, TWO_SERVICES.split("  - name: dns")[0])
        await sink.wait_until(lambda: len(sink.events) >= 2)
        await asyncio.sleep(DEBOUNCE + 3 * POLL)

        events = sink.take()
    assert [describe(e) for e in events] == [
        "service - default/dns", "slice - default/dns-ipv4-5353",
    ]


async def test_services_empty_list_deletes_everything(services_file: Path) -> None:
    source, sink = start(services_file)
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        rewrite(services_file, "services: []\n")
        await sink.wait_until(lambda: len(sink.events) >= 4)

        events = sink.take()
    assert sorted(describe(e) for e in events) == [
        "service - default/dns", "service - default/web",
        "slice - default/dns-ipv4-5353", "slice - default/web-ipv4",
    ]


async def test_file_replaced_by_rename_is_noticed(services_file: Path) -> None:
    source, sink = start(services_file)
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        # what editors and `kubectl get > tmp && mv tmp file` do: a new inode, same name
        replacement = services_file.with_suffix(".tmp")
        replacement.write_text(TWO_SERVICES.replace("port: 53,", "port: 54,"))
        replacement.replace(services_file)
        await sink.wait_until(lambda: bool(sink.events))

        events = sink.take()
    assert [describe(e) for e in events] == ["service ~ default/dns"]


async def test_debounce_reads_a_file_written_in_pieces_once(services_file: Path) -> None:
    source = FileSource(services_file, debounce=0.5, poll_interval=POLL)
    source.load_initial()
    sink = RecordingSink()
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        whole = TWO_SERVICES.replace("port: 80,", "port: 81,")
        with services_file.open("w") as half_written:
            half_written.write(whole[: len(whole) // 2])
            half_written.flush()
            await asyncio.sleep(0.1)  # well inside the 0.5 s debounce
            half_written.write(whole[len(whole) // 2:])
        await sink.wait_until(lambda: bool(sink.events))
        await asyncio.sleep(3 * POLL)

        events = sink.take()
    assert [describe(e) for e in events] == ["service ~ default/web"]  # no error in between


def test_load_initial_raises_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services:\n  - name: web\n    ports: [{port: 0}]\n")
    source = FileSource(path)

    with pytest.raises(SourceFileError) as caught:
        source.load_initial()

    assert str(caught.value) == (
        f"{path}:3: services[0].ports[0].port: must be an integer 1-65535, got 0"
    )


async def test_run_without_load_initial_waits_for_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services: [\n")
    source = FileSource(path, debounce=DEBOUNCE, poll_interval=POLL)
    sink = RecordingSink()
    async with running(source, sink):
        await sink.wait_until(lambda: bool(sink.events))
        first = sink.take()

        rewrite(path, "services: [{name: late, ports: [{port: 80}]}]\n")
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))

        later = sink.take()
    assert len(first) == 1 and first[0][0] == "error"
    assert str(first[0][2]).startswith(f"{path}:2: invalid YAML: ")
    assert [describe(e) for e in later] == ["service + default/late", "synced file"]


async def test_folder_source_notices_a_new_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("services: [{name: a, ports: [{port: 80}]}]\n")
    source, sink = start(tmp_path)
    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
        await asyncio.sleep(3 * POLL)
        sink.take()

        (tmp_path / "b.yaml").write_text("services: [{name: b, ports: [{port: 81}]}]\n")
        await sink.wait_until(lambda: bool(sink.events))

        events = sink.take()
    assert [describe(e) for e in events] == ["service + default/b"]


async def test_an_edit_that_keeps_size_and_stamps_is_seen_by_its_event(
        services_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem whose timestamps tick coarsely, an edit may leave the
    file's fingerprint as it was. Read in the same tick as its write, the file
    is read again on the next inotify event, not on a timer (none is due: the
    safety check is a minute away)."""
    stamp = time.time_ns()  # "now": every load below is in the same tick

    def fixed(path: Path) -> tuple[tuple[str, int, int, int, int], ...]:
        return ((path.name, 1, len(TWO_SERVICES), stamp, stamp),)

    monkeypatch.setattr("uproxy.sources.file.fingerprint", fixed)
    source = FileSource(services_file, debounce=DEBOUNCE, poll_interval=POLL,
                        safety_interval=60.0)
    source.load_initial()
    sink = RecordingSink()
    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
        assert source._watch.active, "needs inotify"
        sink.take()

        rewrite(services_file, TWO_SERVICES.replace("port: 80,", "port: 81,"))  # same size
        await sink.wait_until(lambda: bool(sink.events))

        events = sink.take()
    assert [describe(e) for e in events] == ["service ~ default/web"]
