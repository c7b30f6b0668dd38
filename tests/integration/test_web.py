"""The healthz and metrics servers, over real HTTP on loopback.

The state behind them is the fake proxier of the status unit tests, made of
real PortStats and a real Balancer; the tests change those counters as the
data path would and watch /metrics, /healthz, /readyz and /status.json follow.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_status import DNS, WEB, Clock, FakeProxier, FakeRunner, FakeTracker
from uproxy.logs import TextFormatter
from uproxy.metrics import Metrics
from uproxy.model import ServicePortName
from uproxy.web import WebBindError, WebServer, WebState, start_web

SYNC_PERIOD = 30.0
REQUIRED = frozenset({"services", "endpointslices"})


@dataclass
class World:
    proxier: FakeProxier
    runner: FakeRunner
    tracker: FakeTracker
    clock: Clock
    state: WebState
    metrics: Metrics


@pytest.fixture
def world() -> World:
    clock = Clock(5000.0)
    proxier = FakeProxier(clock=clock)
    runner, tracker = FakeRunner(), FakeTracker()
    metrics = Metrics(proxier, wall=lambda: 1_700_000_000.0)
    state = WebState(proxier, runner, tracker, REQUIRED, SYNC_PERIOD, metrics=metrics,
                     monotonic=clock, wall=lambda: 1_700_000_000.0 + clock.now)
    return World(proxier, runner, tracker, clock, state, metrics)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def metrics_server(world: World) -> AsyncIterator[WebServer]:
    server = await start_web(("127.0.0.1", 0), "metrics", world.state)
    assert server is not None
    yield server
    await server.close()


@pytest.fixture
async def healthz_server(world: World) -> AsyncIterator[WebServer]:
    server = await start_web(("127.0.0.1", 0), "healthz", world.state)
    assert server is not None
    yield server
    await server.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, server: WebServer) -> Samples:
    async with http.get(server.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


WEB_LABELS = {"service": "default/web", "port": "80", "protocol": "TCP"}


async def test_counters_move_as_connections_open_fail_and_close(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    stats = world.proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"])

    before = await scrape(http, metrics_server)
    assert value(before, "uproxy_connections_total", **WEB_LABELS) == 0
    assert value(before, "uproxy_services") == 1
    assert value(before, "uproxy_endpoints") == 2
    assert value(before, "uproxy_listeners") == 1

    # three connections open, one dial fails, one finds no endpoints, two close
    for _ in range(3):
        world.proxier.connect(WEB)
    stats.record_dial(0.0008)
    stats.record_dial(0.003)
    stats.connections_failed += 1
    stats.dial_attempts_failed += 4
    stats.no_endpoints += 1
    stats.connections_active -= 2
    stats.bytes_in += 1500
    stats.bytes_out += 64000

    during = await scrape(http, metrics_server)
    assert value(during, "uproxy_connections_total", **WEB_LABELS) == 3
    assert value(during, "uproxy_connections_active", **WEB_LABELS) == 1
    assert value(during, "uproxy_connection_failures_total", **WEB_LABELS, reason="dial") == 1
    assert value(during, "uproxy_connection_failures_total", **WEB_LABELS,
                 reason="no_endpoints") == 1
    assert value(during, "uproxy_dial_failures_total", **WEB_LABELS) == 4
    assert value(during, "uproxy_bytes_total", **WEB_LABELS, direction="in") == 1500
    assert value(during, "uproxy_bytes_total", **WEB_LABELS, direction="out") == 64000
    assert value(during, "uproxy_endpoint_picks_total", **WEB_LABELS,
                 endpoint="127.0.0.1:8080") == 2
    assert value(during, "uproxy_endpoint_picks_total", **WEB_LABELS,
                 endpoint="127.0.0.2:8080") == 1
    assert value(during, "uproxy_dial_duration_seconds_count", **WEB_LABELS) == 2
    assert value(during, "uproxy_dial_duration_seconds_bucket", **WEB_LABELS, le="0.001") == 1
    assert value(during, "uproxy_dial_duration_seconds_bucket", **WEB_LABELS, le="0.005") == 2
    assert value(during, "uproxy_dial_duration_seconds_sum", **WEB_LABELS) == pytest.approx(
        0.0038)
    assert stats.dial_latencies == []  # drained by the scrape

    # the histogram keeps what it drained; new dials add to it
    stats.record_dial(0.3)
    after = await scrape(http, metrics_server)
    assert value(after, "uproxy_dial_duration_seconds_count", **WEB_LABELS) == 3
    assert value(after, "uproxy_dial_duration_seconds_bucket", **WEB_LABELS, le="0.25") == 2
    assert value(after, "uproxy_dial_duration_seconds_bucket", **WEB_LABELS, le="+Inf") == 3


async def test_udp_figures_only_for_udp_ports(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    world.proxier.serve(WEB, 80, ["127.0.0.1:8080"])
    dns = world.proxier.serve(DNS, 53, ["127.0.0.1:5353"], listener=("0.0.0.0", 30053))
    dns.udp_sessions_created, dns.udp_sessions_expired, dns.udp_sessions_active = 7, 5, 2
    dns.udp_datagrams_dropped = 3

    samples = await scrape(http, metrics_server)
    labels = {"service": "kube-system/dns", "port": "53", "protocol": "UDP"}
    assert value(samples, "uproxy_udp_sessions_active", **labels) == 2
    assert value(samples, "uproxy_udp_sessions_total", **labels, event="created") == 7
    assert value(samples, "uproxy_udp_sessions_total", **labels, event="expired") == 5
    assert value(samples, "uproxy_udp_datagrams_dropped_total", **labels) == 3
    assert not any(name.startswith("uproxy_udp") and ("service", "default/web") in found
                   for name, found in samples)


async def test_sync_rules_and_source_figures(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    world.metrics.sync.observe_sync(0.012)
    world.metrics.sync.observe_sync(0.2)
    world.metrics.sync.rules_apply_failed()
    world.metrics.sources.watch_restarts[("kube", "services")] = 1
    world.metrics.sources.relists[("kube", "endpointslices")] = 2
    world.metrics.sources.errors["file"] = 1
    world.metrics.sources.list_pages[("kube", "services")] = 3
    world.metrics.sources.expired_lists[("kube", "services")] = 1

    samples = await scrape(http, metrics_server)
    assert value(samples, "uproxy_sync_duration_seconds_count") == 2
    assert value(samples, "uproxy_sync_duration_seconds_bucket", le="0.016") == 1
    assert value(samples, "uproxy_sync_proxy_rules_last_timestamp_seconds") == 1_700_000_000.0
    assert value(samples, "uproxy_rules_apply_failures_total") == 1
    assert value(samples, "uproxy_source_watch_restarts_total", source="kube",
                 resource="services") == 1
    assert value(samples, "uproxy_source_relists_total", source="kube",
                 resource="endpointslices") == 2
    assert value(samples, "uproxy_source_errors_total", source="file") == 1
    assert value(samples, "uproxy_source_list_pages_total", source="kube", resource="services") == 3
    assert value(samples, "uproxy_source_expired_lists_total", source="kube",
                 resource="services") == 1


async def test_accept_backoffs_never_go_down_when_a_port_goes_away(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    world.proxier.serve(WEB, 80, ["127.0.0.1:8080"]).accept_backoffs = 3
    world.proxier.serve(DNS, 53, ["127.0.0.1:5353"]).accept_backoffs = 1
    assert value(await scrape(http, metrics_server), "uproxy_accept_backoffs_total") == 4

    del world.proxier.stats[WEB], world.proxier.applied[WEB], world.proxier.bound[WEB]
    samples = await scrape(http, metrics_server)
    assert value(samples, "uproxy_accept_backoffs_total") == 4
    assert not any(("service", "default/web") in labels for _, labels in samples)


async def test_no_client_ip_labels(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    world.proxier.serve(WEB, 80, ["127.0.0.1:8080"], affinity=60.0)
    for i in range(50):
        world.proxier.connect(WEB, client=f"127.0.1.{i}")
    samples = await scrape(http, metrics_server)
    label_values = {v for _, labels in samples for _, v in labels}
    assert not any(v.startswith("127.0.1.") for v in label_values)


async def test_healthz_turns_503_when_syncs_stop(
    world: World, healthz_server: WebServer, http: aiohttp.ClientSession
) -> None:
    # just started, no sync yet: healthy (kube-proxy's startup grace)
    async with http.get(healthz_server.url + "/healthz") as response:
        assert response.status == 200
        assert (await response.json())["lastUpdated"] is None

    world.runner.last_success, world.runner.syncs = world.clock.now, 1
    world.clock.now += 2 * SYNC_PERIOD  # within 2 x period + 5 s margin
    async with http.get(healthz_server.url + "/healthz") as response:
        body = await response.json()
        assert response.status == 200
        assert body["nodeHealthy"] is True and body["ageSeconds"] == 60.0

    world.clock.now += 6  # the sync is stuck: 66 s > 65 s
    async with http.get(healthz_server.url + "/healthz") as response:
        body = await response.json()
        assert response.status == 503
        assert body["nodeHealthy"] is False
        assert body["reason"] == "last successful sync was 66.0s ago (threshold 65s)"
        assert body["lastUpdated"] < body["currentTime"]

    world.runner.last_success = world.clock.now  # a sync succeeds again
    async with http.get(healthz_server.url + "/healthz") as response:
        assert response.status == 200


async def test_readyz_waits_for_every_source_and_one_sync(
    world: World, healthz_server: WebServer, http: aiohttp.ClientSession
) -> None:
    async def readyz() -> tuple[int, dict[str, object]]:
        async with http.get(healthz_server.url + "/readyz") as response:
            return response.status, await response.json()

    status, body = await readyz()
    assert status == 503
    assert body["reason"] == ("waiting for the first full view of endpointslices, services; "
                              "no sync has completed yet")

    world.tracker.synced_sources.add("services")
    world.tracker.synced_sources.add("endpointslices")
    status, body = await readyz()
    assert (status, body["reason"]) == (503, "no sync has completed yet")

    world.runner.last_success, world.runner.syncs = world.clock.now, 1
    status, body = await readyz()
    assert (status, body) == (200, {"ready": True, "sourcesMissing": [], "synced": True})


async def test_each_server_serves_only_its_own_paths(
    world: World, healthz_server: WebServer, metrics_server: WebServer,
    http: aiohttp.ClientSession,
) -> None:
    async with http.get(healthz_server.url + "/metrics") as response:
        assert response.status == 404
    async with http.get(metrics_server.url + "/healthz") as response:
        assert response.status == 404
    async with http.get(metrics_server.url + "/", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (302, "/status")


async def test_status_json_and_page(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    world.proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"])
    world.proxier.connect(WEB)
    world.runner.last_success, world.runner.syncs = world.clock.now - 1.25, 3

    async with http.get(metrics_server.url + "/status.json") as response:
        assert response.status == 200
        status = await response.json()
    (service,) = status["services"]
    (port,) = service["ports"]
    assert port["listener"] == "0.0.0.0:30001"
    assert [e["picks"] for e in port["endpoints"]] == [1, 0]
    assert status["sync"]["last_success_age_seconds"] == 1.25
    assert status["health"]["nodeHealthy"] is True

    async with http.get(metrics_server.url + "/status") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert 'fetch("status.json"' in page
    # self-contained: no external scripts, styles, fonts or images
    assert "<link" not in page and "src=" not in page and "@import" not in page
    assert "https://" not in page and "http://" not in page


async def test_port_zero_picks_a_port_and_logs_it(
    world: World, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    caplog.set_level(logging.INFO, logger="uproxy.web")
    healthz = await start_web(("127.0.0.1", 0), "healthz", world.state)
    metrics = await start_web(("127.0.0.1", 0), "metrics", world.state)
    assert healthz is not None and metrics is not None
    try:
        assert healthz.port != 0 and metrics.port != 0 and healthz.port != metrics.port
        messages = [r.getMessage() for r in caplog.records]
        assert f"healthz listening on http://127.0.0.1:{healthz.port}" in messages
        assert f"metrics listening on http://127.0.0.1:{metrics.port}" in messages
        # The text line says the address once (it used to repeat it as url=...).
        lines = [TextFormatter().format(r) for r in caplog.records]
        assert all(line.count("http://") == 1 for line in lines if "listening" in line)
        async with http.get(healthz.url + "/healthz") as response:
            assert response.status == 200
    finally:
        await healthz.close()
        await metrics.close()


async def test_ipv6_loopback_bind(world: World, http: aiohttp.ClientSession) -> None:
    server = await start_web(("::1", 0), "metrics", world.state)
    assert server is not None
    try:
        assert server.url.startswith("http://[::1]:")
        async with http.get(server.url + "/metrics") as response:
            assert response.status == 200
    finally:
        await server.close()


async def test_empty_address_disables_the_server(world: World) -> None:
    assert await start_web(None, "metrics", world.state) is None


async def test_port_in_use_is_one_clear_error(world: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(WebBindError) as caught:
            await start_web(("127.0.0.1", port), "healthz", world.state)
    assert str(caught.value) == f"--healthz-bind-address 127.0.0.1:{port}: address already in use"


async def test_scrape_in_slices_sees_every_port_as_the_plain_exposition_does(
    world: World, metrics_server: WebServer, http: aiohttp.ClientSession
) -> None:
    for i in range(250):  # crosses two slice boundaries (100 ports each)
        name = ServicePortName("load", f"svc{i:03}", "http", "TCP")
        world.proxier.serve(name, 8000 + i, [f"127.0.0.{1 + i % 200}:80"],
                            listener=("0.0.0.0", 40000 + i))
        world.proxier.connect(name)
    samples = await scrape(http, metrics_server)
    accepted = [labels for name, labels in samples if name == "uproxy_connections_total"]
    assert len(accepted) == 250
    assert value(samples, "uproxy_connections_total", service="load/svc249", port="8249",
                 protocol="TCP") == 1

    plain = generate_latest(world.metrics.registry).decode()
    async with http.get(metrics_server.url + "/metrics") as response:
        assert await response.text() == plain
