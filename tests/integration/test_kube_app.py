"""A whole uproxy fed by the Kubernetes source (the test API server):
bursts coalesce into few syncs, nothing is served before the first full
list, and serving follows the cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.integration.apphelpers import Backends, running_uproxy, tcp_exchange
from tests.kubeapi import FakeKubeAPI, endpoint_slice, service
from uproxy import app
from uproxy.cli import parse_settings
from uproxy.sources.kube import KubeSource

LAPTOP = ("--bind-range", "127.77.0.0/16")


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI(bookmark_interval=1.0)
    await server.start()
    yield server
    await server.stop()



def _source(api: FakeKubeAPI) -> KubeSource:
    return KubeSource(master=api.url, watch_timeout=5, backoff_initial=0.1, backoff_cap=0.5)


async def test_a_burst_of_1000_services_is_served_in_few_syncs(
    api: FakeKubeAPI, backends: Backends
) -> None:
    port = await backends.tcp("pod")
    api.create(service("default", "first", ports=[{"name": "p", "port": 7000}]))
    api.create(endpoint_slice("default", "first-x", "first", addresses=["127.0.0.1"],
                              ports=[{"name": "p", "port": port}]))
    async with running_uproxy(None, *LAPTOP, "--min-sync-period", "500ms",
                              source=_source(api)) as up:
        await up.wait_for(lambda: len(up.parts.pool.listeners) == 1)
        syncs = up.parts.runner.syncs
        started = time.monotonic()
        for i in range(1000):
            name = f"burst-{i}"
            api.create(service("burst", name, ports=[{"name": "p", "port": 7000}],
                               cluster_ip=f"198.18.{i // 250}.{i % 250 + 1}"))
            api.create(endpoint_slice("burst", f"{name}-x", name, addresses=["127.0.0.1"],
                                      ports=[{"name": "p", "port": port}]))
        await up.wait_for(lambda: len(up.parts.pool.listeners) == 1001, timeout=30)
        elapsed = time.monotonic() - started
        burst_syncs = up.parts.runner.syncs - syncs
        assert burst_syncs <= 12, f"{burst_syncs} syncs for one burst"
        assert not up.parts.pool.errors
        # Every one of them is served; sample a few across the burst.
        for i in (0, 499, 999):
            address = up.address(f"burst/burst-{i}", "p")
            assert await tcp_exchange(address) == b"pod:ping"
        print(f"1000 services served {elapsed:.2f}s after the burst began, in {burst_syncs} syncs")


async def test_nothing_is_served_before_the_first_full_list(
    api: FakeKubeAPI, backends: Backends
) -> None:
    port = await backends.tcp("pod")
    api.create(service("default", "web", ports=[{"name": "http", "port": 7100}]))
    api.create(endpoint_slice("default", "web-x", "web", addresses=["127.0.0.1"],
                              ports=[{"name": "http", "port": port}]))
    await api.outage_begin()  # the API is down when uproxy starts
    settings_flags = (*LAPTOP, "--sync-period", "1s")
    async with running_uproxy(None, *settings_flags, source=_source(api)) as up:
        await asyncio.sleep(1.5)  # periodic syncs come and go meanwhile
        assert not up.parts.proxier.ready
        assert not up.parts.pool.listeners
        await api.outage_end()
        await up.wait_for(lambda: len(up.parts.pool.listeners) == 1, timeout=10)
        assert up.parts.proxier.ready
        assert await tcp_exchange(up.address("default/web", "http")) == b"pod:ping"
        # The source's list counters reach the metrics (one page per resource here).
        app.copy_source_counters(up.parts)
        pages = up.parts.metrics.sources.list_pages
        assert pages[(up.parts.source.name, "services")] == 1
        assert pages[(up.parts.source.name, "endpointslices")] == 1
        assert up.parts.metrics.sources.expired_lists[(up.parts.source.name, "services")] == 0


async def test_pod_moves_and_service_deletion_follow_the_cluster(
    api: FakeKubeAPI, backends: Backends
) -> None:
    old, new = await backends.tcp("old"), await backends.tcp("new")
    api.create(service("default", "web", ports=[{"name": "http", "port": 7200}]))
    api.create(endpoint_slice("default", "web-x", "web", addresses=["127.0.0.1"],
                              ports=[{"name": "http", "port": old}]))
    async with running_uproxy(None, *LAPTOP, source=_source(api)) as up:
        await up.wait_for(lambda: len(up.parts.pool.listeners) == 1)
        address = up.address("default/web", "http")
        assert await tcp_exchange(address) == b"old:ping"
        api.update(endpoint_slice("default", "web-x", "web", addresses=["127.0.0.1"],
                                  ports=[{"name": "http", "port": new}]))
        api.drop_streams()  # the change arrives across a dropped watch
        for _ in range(100):
            if await tcp_exchange(address) == b"new:ping":
                break
            await asyncio.sleep(0.05)
        assert await tcp_exchange(address) == b"new:ping"
        api.delete("Service", "default", "web")
        await up.wait_for(lambda: not up.parts.pool.listeners)
        with pytest.raises(ConnectionRefusedError):
            await tcp_exchange(address)


@pytest.mark.parametrize("proxy_name", [None, "uproxy"])
async def test_service_proxy_name_chooses_the_services_beside_kube_proxy(
    api: FakeKubeAPI, backends: Backends, proxy_name: str | None
) -> None:
    """Without the flag, labelled services belong to another proxy (as for
    kube-proxy); with --service-proxy-name uproxy, only those labelled so are
    served, and the API is asked for exactly those."""
    port = await backends.tcp("pod")
    for name, label in (("plain", None), ("mine", "uproxy"), ("theirs", "cilium")):
        labels = {"service.kubernetes.io/service-proxy-name": label} if label else {}
        api.create(service("default", name, ports=[{"name": "p", "port": 7100}], labels=labels))
        api.create(endpoint_slice("default", f"{name}-x", name, addresses=["127.0.0.1"],
                                  ports=[{"name": "p", "port": port}], labels=labels))
    flags = [*LAPTOP, *(["--service-proxy-name", proxy_name] if proxy_name else [])]
    settings, _ = parse_settings(["--master", api.url, *flags])
    source = app.make_source(settings)
    async with running_uproxy(None, *flags, source=source) as up:
        await up.wait_for(lambda: len(up.parts.pool.listeners) == 1)
        served = {str(name.service) for name in up.parts.pool.listeners}
        assert served == ({"default/mine"} if proxy_name else {"default/plain"})
        assert await tcp_exchange(up.address(served.pop(), "p")) == b"pod:ping"
    selectors = {query.get("labelSelector") for _, path, query in api.requests
                 if path.endswith(("/services", "/endpointslices"))}
    expected = ("service.kubernetes.io/service-proxy-name=uproxy,!service.kubernetes.io/headless"
                if proxy_name else
                "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
    assert selectors == {expected}
