"""A whole uproxy with its web servers: metrics move with real traffic,
health and readiness, the status document, access logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.apphelpers import (
    Backends,
    eventually,
    running_uproxy,
    tcp_exchange,
    udp_exchange,
    write_services,
)
from uproxy.picking import DIAL_TIMEOUTS

WEB = ("--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0")



def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections: bound, never listening, so
    nothing else can take it while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_metrics_status_and_health_follow_real_traffic(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("m")
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": "web", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [f"127.0.0.1:{port}"]},
        {"name": "empty", "ports": [{"port": 8081}], "endpoints": []},
        {"name": "down", "ports": [{"port": 8082}], "endpoints": ["127.0.0.1:1"]},
    ])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16", *WEB) as up:
        healthz, metrics = (server.url for server in up.parts.web_servers)
        labels = {"service": "default/web", "port": "8080", "protocol": "TCP"}
        async with aiohttp.ClientSession() as http:
            before = samples(await (await http.get(f"{metrics}/metrics")).text())
            for _ in range(3):
                assert await tcp_exchange(up.address("default/web", "http"), b"x" * 1000) \
                    == b"m:" + b"x" * 1000
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await tcp_exchange(up.address("default/empty"))
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await tcp_exchange(up.address("default/down"), timeout=10)
            await asyncio.sleep(0.1)  # closes are counted when both sides are done
            after = samples(await (await http.get(f"{metrics}/metrics")).text())

            def moved(name: str, **extra: str) -> float:
                return value(after, name, **{**labels, **extra}) - value(before, name,
                                                                         **{**labels, **extra})

            assert moved("uproxy_connections_total") == 3
            assert moved("uproxy_bytes_total", direction="in") == 3000
            assert moved("uproxy_bytes_total", direction="out") == 3006
            assert value(after, "uproxy_connections_active", **labels) == 0
            assert value(after, "uproxy_connection_failures_total", service="default/empty",
                         port="8081", protocol="TCP", reason="no_endpoints") == 1
            assert value(after, "uproxy_connection_failures_total", service="default/down",
                         port="8082", protocol="TCP", reason="dial") == 1
            assert value(after, "uproxy_endpoint_picks_total", **labels,
                         endpoint=f"127.0.0.1:{port}") >= 3
            assert value(after, "uproxy_listeners") == 3
            assert value(after, "uproxy_sync_duration_seconds_count") >= 1
            # "down" has one endpoint: every attempt of the backoff dialled it
            assert value(after, "uproxy_dial_failures_total", service="default/down",
                         port="8082", protocol="TCP") == len(DIAL_TIMEOUTS)

            health = await http.get(f"{healthz}/healthz")
            assert health.status == 200 and (await health.json())["nodeHealthy"] is True
            ready = await http.get(f"{healthz}/readyz")
            assert ready.status == 200

            status = await (await http.get(f"{metrics}/status.json")).json()
            text = json.dumps(status)
            assert "default/web" in text and up.address("default/web", "http")[0] in text
            page = await http.get(f"{metrics}/status")
            assert page.status == 200 and "<html" in (await page.text()).lower()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_udp_bytes_are_counted_exactly_in_metrics_and_status(
    tmp_path: Path, backends: Backends, workers: str
) -> None:
    port = await backends.udp("u")  # replies "u:" + the datagram
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "dns", "ports": [{"port": 5353, "protocol": "UDP"}],
                               "endpoints": [f"127.0.0.1:{port}"]}])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16", "--workers", workers,
                              *WEB) as up:
        _, metrics = (server.url for server in up.parts.web_servers)
        labels = {"service": "default/dns", "port": "5353", "protocol": "UDP"}
        address = up.address("default/dns", "", "UDP")
        sizes = [1, 100, 1000, 60_000]
        for size in sizes:  # new sessions each (a new client socket per exchange)
            reply, _ = await udp_exchange(address, b"d" * size)
            assert reply == b"u:" + b"d" * size
        sent, received = sum(sizes), sum(sizes) + 2 * len(sizes)

        async with aiohttp.ClientSession() as http:
            async def counted() -> bool:
                found = samples(await (await http.get(f"{metrics}/metrics")).text())
                return (value(found, "uproxy_bytes_total", **labels, direction="in") == sent
                        and value(found, "uproxy_bytes_total", **labels,
                                  direction="out") == received)

            await eventually(counted, timeout=10)  # workers report every second
            status = await (await http.get(f"{metrics}/status.json")).json()
        (service,) = [s for s in status["services"] if s["service"] == "default/dns"]
        (row,) = service["ports"]
        assert row["bytes"] == {"in": sent, "out": received}
        assert row["udp"]["datagrams_in"] == row["udp"]["datagrams_out"] == len(sizes)


async def test_dial_failures_count_every_dial_to_a_dead_endpoint_even_after_failover(
    tmp_path: Path, backends: Backends
) -> None:
    live = await backends.tcp("ok")
    connections = 6
    with refusing_port() as dead_port:
        dead = f"127.0.0.1:{dead_port}"
        services = tmp_path / "services.yaml"
        write_services(services, [{"name": "half", "ports": [{"port": 8080}],
                                   "endpoints": [dead, f"127.0.0.1:{live}"]}])
        async with running_uproxy(services, "--bind-range", "127.77.0.0/16", *WEB) as up:
            metrics = up.parts.web_servers[1].url
            labels = {"service": "default/half", "port": "8080", "protocol": "TCP"}
            async with aiohttp.ClientSession() as http:
                status = await (await http.get(f"{metrics}/status.json")).json()
                (port,) = [port for service in status["services"]
                           if service["service"] == "default/half" for port in service["ports"]]
                # Round-robin over [dead, live] in shuffled order: the first
                # connection hits the dead endpoint only if it is next now; a
                # failed dial fails over to the live one, which leaves the
                # dead one next again, so every later connection hits it once.
                first_hits_dead = port["next_endpoint"] == dead
                for _ in range(connections):
                    assert await tcp_exchange(up.address("default/half"), b"hi") == b"ok:hi"
                await asyncio.sleep(0.1)
                after = samples(await (await http.get(f"{metrics}/metrics")).text())

    assert value(after, "uproxy_connections_total", **labels) == connections
    assert value(after, "uproxy_dial_failures_total", **labels) \
        == connections - 1 + first_hits_dead
    assert value(after, "uproxy_endpoint_picks_total", **labels, endpoint=dead) \
        == connections - 1 + first_hits_dead
    assert value(after, "uproxy_connection_failures_total", **labels, reason="dial") == 0
    assert value(after, "uproxy_connection_failures_total", **labels, reason="no_endpoints") == 0


async def test_stuck_sync_turns_healthz_503(tmp_path: Path, backends: Backends) -> None:
    port = await backends.tcp("h")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]}])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16", *WEB,
                              "--sync-period", "1s") as up:
        healthz = up.parts.web_servers[0].url
        # Make syncs hang: the next one never finishes.
        never = asyncio.Event()
        original = up.parts.proxier.sync

        async def stuck() -> object:
            await never.wait()
            return await original()

        up.parts.proxier.sync = stuck  # type: ignore[method-assign]
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{healthz}/healthz")).status == 200
            # Threshold is 2 x sync period + 5 s margin: 7 s.
            deadline = asyncio.get_running_loop().time() + 12
            while (response := await http.get(f"{healthz}/healthz")).status == 200:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.25)
            assert response.status == 503
            assert "ageSeconds" in await response.json()
        never.set()
        up.parts.proxier.sync = original  # type: ignore[method-assign]


async def test_verbose_writes_one_access_line_per_connection(
    tmp_path: Path, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    port = await backends.tcp("a")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]}])
    caplog.set_level(logging.INFO)
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16", "-v") as up:
        assert up.parts.access_log is not None
        for _ in range(2):
            assert await tcp_exchange(up.address("default/s"), b"hello") == b"a:hello"
        await asyncio.sleep(0.1)
    lines = [r.__dict__ for r in caplog.records if r.name == "uproxy.access"]
    assert len(lines) == 2
    for line in lines:
        assert line["service"] == "default/s"
        assert line["endpoint"] == f"127.0.0.1:{port}"
        assert (line["bytes_in"], line["bytes_out"]) == (5, 7)
        assert line["outcome"] == "ok" and line["duration"] >= 0
