"""A short-form service whose endpoints are all of the other IP family has no
endpoints (slices are matched to the service's families, as in Kubernetes).
The file still loads; the loader says so in one warning line naming the file,
the line, and the service, at load and at every reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from uproxy.model import EndpointSlice, ObjectName, Service
from uproxy.planner import desired_state
from uproxy.sources.file import FileSource, load_services_file
from uproxy.sources.objects import family_mismatch

LOGGER = "uproxy.sources.file"

V6_SERVICE_V4_ENDPOINTS = """\
services:
  - name: ok
    clusterIP: 198.18.0.10
    ports: [{port: 80}]
    endpoints: [127.0.0.1]
  - name: web
    clusterIP: fd00::10
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - 127.0.0.1
      - 127.0.0.2
"""


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def test_ipv6_only_service_with_ipv4_endpoints_loads_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(V6_SERVICE_V4_ENDPOINTS)
    caplog.set_level(logging.WARNING, LOGGER)

    services, slices = load_services_file(path)

    assert warnings_of(caplog) == [
        f"{path}:10: default/web: endpoints are IPv4 but the service is IPv6 only "
        "(clusterIP fd00::10); it has no endpoints"
    ]
    assert ObjectName("default", "web") in services  # a warning, not an error
    # ...and the warning tells the truth: the planner gives the port no endpoints
    state = desired_state(services, slices)
    endpoints = {str(name.service): len(port.endpoints) for name, port in state.ports.items()}
    assert endpoints == {"default/ok": 1, "default/web": 0}


def test_ipv4_only_service_with_ipv6_endpoints_is_the_same_trap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services:\n"
                    "  - {name: dns, namespace: kube-system, clusterIP: 198.18.0.53,\n"
                    "     ports: [{port: 53, protocol: UDP}], endpoints: ['[::1]:5353']}\n")
    caplog.set_level(logging.WARNING, LOGGER)

    load_services_file(path)

    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"{path}:3: kube-system/dns: endpoints are IPv6 but the service "
                              "is IPv4 only (clusterIP 198.18.0.53)")
    assert "\n" not in warning


def test_some_endpoints_of_the_other_family_are_named_as_unused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services:\n"
                    "  - name: web\n"
                    "    clusterIP: 198.18.0.10\n"
                    "    ports: [{port: 80}]\n"
                    "    endpoints: [127.0.0.1, '::1', 127.0.0.2]\n")
    caplog.set_level(logging.WARNING, LOGGER)

    load_services_file(path)

    assert warnings_of(caplog) == [
        f"{path}:5: default/web: 1 of 3 endpoints are IPv6 but the service is IPv4 only "
        "(clusterIP 198.18.0.10); those are not used"
    ]


@pytest.mark.parametrize("entry", [
    "{name: a, clusterIP: 198.18.0.1, ports: [{port: 80}], endpoints: [127.0.0.1]}",
    "{name: b, clusterIP: 'fd00::1', ports: [{port: 80}], endpoints: ['::1']}",
    # no clusterIP (laptop mode): both families are used
    "{name: c, ports: [{port: 80}], endpoints: [127.0.0.1, '::1']}",
    # dual stack: both families are used
    "{name: d, clusterIPs: [198.18.0.1, 'fd00::1'], ports: [{port: 80}], endpoints: ['::1']}",
    # nothing to use in the first place
    "{name: e, clusterIP: 'fd00::1', ports: [{port: 80}], endpoints: []}",
])
def test_no_warning_when_every_endpoint_can_be_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, entry: str
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(f"services:\n  - {entry}\n")
    caplog.set_level(logging.WARNING, LOGGER)

    services, _ = load_services_file(path)

    assert len(services) == 1
    assert warnings_of(caplog) == []


def test_kubernetes_objects_are_not_checked() -> None:
    service = Service(namespace="default", name="web", cluster_ips=("fd00::10",))
    v4 = EndpointSlice(namespace="default", name="web-x", service_name="web",
                       address_type="IPv4")
    assert family_mismatch(service, [v4]) is None  # no endpoints in the slice: nothing lost


def test_warn_callback_gets_the_lines_instead_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(V6_SERVICE_V4_ENDPOINTS)
    caplog.set_level(logging.WARNING, LOGGER)
    got: list[str] = []

    load_services_file(path, got.append)

    assert len(got) == 1 and got[0].startswith(f"{path}:10: default/web: ")
    assert warnings_of(caplog) == []


class _Sink:
    def __init__(self) -> None:
        self.synced = asyncio.Event()
        self.services: list[Service | None] = []

    def on_service(self, previous: Service | None, current: Service | None) -> None:
        self.services.append(current)

    def on_slice(self, previous: EndpointSlice | None, current: EndpointSlice | None) -> None:
        pass

    def on_node(self, previous: object, current: object) -> None:
        pass

    def on_synced(self, source: str) -> None:
        self.synced.set()

    def on_source_error(self, source: str, message: str) -> None:
        raise AssertionError(message)


async def test_file_source_warns_once_at_load_and_once_at_each_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(V6_SERVICE_V4_ENDPOINTS)
    caplog.set_level(logging.INFO, LOGGER)
    source = FileSource(path, debounce=0.02, poll_interval=0.02)

    source.load_initial()
    assert len(warnings_of(caplog)) == 1

    sink = _Sink()
    task = asyncio.create_task(source.run(sink))
    try:
        await asyncio.wait_for(sink.synced.wait(), 5)
        assert [s.name for s in sink.services if s is not None] == ["ok", "web"]
        await asyncio.sleep(0.2)  # polls (and a recheck of a just-written file) say nothing new
        assert len(warnings_of(caplog)) == 1
        source.reload()  # SIGHUP
        for _ in range(100):
            if len(warnings_of(caplog)) == 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    warnings = warnings_of(caplog)
    assert len(warnings) == 2 and warnings[0] == warnings[1]
    assert "default/web: endpoints are IPv4 but the service is IPv6 only" in warnings[1]
