"""Timeline tests of the Kubernetes source against the test API server.

Each test reads: given these objects in the API, after these API events and
faults, the sink has seen exactly these changes and the planner would serve
these endpoints. Timings are scaled down (watch timeout 1-2 s instead of
300 s, an outage of 3 s instead of 30 s, backoff capped at 0.5 s instead of
30 s) so the suite stays fast; the code paths are the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes_asyncio import client as kube_client

from tests.integration.apphelpers import running
from tests.kubeapi import FakeKubeAPI, ListCall, endpoint_slice, node, service
from uproxy.model import Endpoint, EndpointSlice, Node, ObjectName, Service, ServicePortName
from uproxy.planner import desired_state
from uproxy.sources.base import Source
from uproxy.sources.kube import LIST_PAGE_SIZE, KubeSource


@dataclass
class RecordingSink:
    """Folds what the source reports and keeps the timeline of it."""

    services: dict[ObjectName, Service] = field(default_factory=dict)
    slices: dict[ObjectName, EndpointSlice] = field(default_factory=dict)
    nodes: dict[ObjectName, Node] = field(default_factory=dict)
    timeline: list[tuple[str, str, str]] = field(default_factory=list)  # (what, change, key)
    synced: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def on_service(self, previous: Service | None, current: Service | None) -> None:
        self._fold(self.services, "service", previous, current)

    def on_slice(self, previous: EndpointSlice | None, current: EndpointSlice | None) -> None:
        self._fold(self.slices, "slice", previous, current)

    def _fold(self, known: dict[ObjectName, Any], what: str, previous: Any, current: Any) -> None:
        key = (current or previous).key
        assert known.get(key) == previous, f"{what} {key}: previous does not match what was known"
        if current is None:
            del known[key]
            change = "delete"
        else:
            known[key] = current
            change = "add" if previous is None else "update"
        self.timeline.append((what, change, str(key)))

    def on_node(self, previous: Node | None, current: Node | None) -> None:
        self._fold(self.nodes, "node", previous, current)

    def on_synced(self, source: str) -> None:
        self.synced.append(source)

    def on_source_error(self, source: str, message: str) -> None:
        self.errors.append(message)

    def endpoints(self, port: ServicePortName, node_name: str | None = None) -> list[str]:
        state = desired_state(self.services, self.slices, node_name=node_name)
        desired = state.ports.get(port)
        return [] if desired is None else [str(e) for e in desired.endpoints]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
                     what: str = "condition") -> float:
    """Poll until `predicate` holds; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return loop.time() - started


def make_source(api: FakeKubeAPI, **overrides: Any) -> KubeSource:
    settings: dict[str, Any] = {
        "watch_timeout": 2, "read_timeout": 3, "backoff_initial": 0.05, "backoff_cap": 0.5,
        "configuration": kube_client.Configuration(host=api.url),
    }
    settings.update(overrides)
    return KubeSource(**settings)


def web(ns: str = "default", name: str = "web", **kw: Any) -> dict[str, Any]:
    return service(ns, name, ports=[{"name": "http", "port": 80, "targetPort": "http"}], **kw)


def web_slice(name: str, addresses: list[str], port: int = 8080, ns: str = "default",
              **kw: Any) -> dict[str, Any]:
    return endpoint_slice(ns, name, "web", addresses=addresses,
                          ports=[{"name": "http", "port": port}], **kw)


HTTP = ServicePortName("default", "web", "http", "TCP")


def test_kube_source_satisfies_the_source_protocol() -> None:
    source: Source = KubeSource(master="http://127.0.0.1:1")
    assert source.name == "kube"
    with pytest.raises(ValueError, match="read_timeout"):
        KubeSource(master="http://x", watch_timeout=10, read_timeout=5)


async def test_first_list_then_watch_then_synced_once(api: FakeKubeAPI) -> None:
    api.create(web())
    api.create(web_slice("web-a", ["10.1.0.1", "10.1.0.2"]))
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: sink.synced == ["kube"], what="first sync")
        assert sink.endpoints(HTTP) == ["10.1.0.1:8080", "10.1.0.2:8080"]
        api.update(web_slice("web-a", ["10.1.0.2", "10.1.0.3"]))
        api.create(service("default", "db", ports=[{"port": 5432}]))
        await wait_until(lambda: sink.endpoints(HTTP) == ["10.1.0.2:8080", "10.1.0.3:8080"])
        await wait_until(lambda: ObjectName("default", "db") in sink.services)
        api.delete("Service", "default", "db")
        await wait_until(lambda: ObjectName("default", "db") not in sink.services)
        # Watches time out (2 s) and are reopened from the last version: no relist.
        await asyncio.sleep(2.5)
        assert source.watches["services"] >= 2
    assert sink.synced == ["kube"]
    assert source.relists == {"services": 0, "endpointslices": 0}
    assert source.watch_restarts == {"services": 0, "endpointslices": 0}
    # The two lists race each other; everything after is in API order.
    assert sorted(sink.timeline[:2]) == [("service", "add", "default/web"),
                                         ("slice", "add", "default/web-a")]
    assert sink.timeline[2:] == [
        ("slice", "update", "default/web-a"),
        ("service", "add", "default/db"),
        ("service", "delete", "default/db"),
    ]


async def test_dropped_streams_resume_from_last_version_without_relist(api: FakeKubeAPI) -> None:
    api.create(web())
    api.create(web_slice("web-a", ["10.1.0.1"]))
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        await wait_until(lambda: api.open_watches == 2)
        before = len(sink.timeline)
        for round_ in range(3):
            assert api.drop_streams() == 2
            api.update(web_slice("web-a", [f"10.1.0.{round_ + 2}"]))
            await wait_until(lambda r=round_: sink.endpoints(HTTP) == [f"10.1.0.{r + 2}:8080"])
            await wait_until(lambda: api.open_watches == 2)
    assert source.relists == {"services": 0, "endpointslices": 0}
    assert source.watch_restarts["endpointslices"] == 3
    assert source.watch_restarts["services"] == 3
    # Only the three real changes; the service was never re-reported.
    assert sink.timeline[before:] == [("slice", "update", "default/web-a")] * 3


async def test_410_relist_reports_only_the_difference(api: FakeKubeAPI) -> None:
    api.create(web())
    api.create(service("default", "stays", ports=[{"port": 1}]))
    api.create(service("default", "goes", ports=[{"port": 2}]))
    api.create(service("default", "changes", ports=[{"port": 3}]))
    api.create(web_slice("web-a", ["10.1.0.1"]))
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        await wait_until(lambda: api.open_watches == 2)
        await api.outage_begin()  # changes happen while uproxy cannot see them ...
        api.delete("Service", "default", "goes")
        api.update(service("default", "changes", ports=[{"port": 33}]))
        api.create(service("default", "new", ports=[{"port": 4}]))
        api.compact()  # ... and the history that would replay them is gone
        await api.outage_end()
        before = len(sink.timeline)
        await wait_until(lambda: source.relists == {"services": 1, "endpointslices": 1},
                         what="both relists")
        await wait_until(lambda: ObjectName("default", "new") in sink.services)
    assert sorted(sink.timeline[before:]) == [
        ("service", "add", "default/new"),
        ("service", "delete", "default/goes"),
        ("service", "update", "default/changes"),
    ]
    assert sink.services[ObjectName("default", "changes")].ports[0].port == 33
    assert source.relists["endpointslices"] == 1  # relisted, and reported nothing
    assert sink.synced == ["kube"]


async def test_restart_with_new_epoch_relists_without_flapping(api: FakeKubeAPI) -> None:
    for i in range(20):
        api.create(service("default", f"s{i}", ports=[{"port": 80}], cluster_ip=f"10.96.1.{i}"))
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: len(sink.services) == 20)
        await wait_until(lambda: api.open_watches == 2)
        before = len(sink.timeline)
        api.restart()  # every old resourceVersion is now 410 Gone
        await wait_until(lambda: source.relists["services"] >= 1, what="relist")
        await wait_until(lambda: api.open_watches == 2)
        api.create(service("default", "after", ports=[{"port": 80}]))
        await wait_until(lambda: ObjectName("default", "after") in sink.services)
    assert sink.timeline[before:] == [("service", "add", "default/after")]


async def test_hung_stream_is_noticed_within_the_read_timeout(api: FakeKubeAPI) -> None:
    """Server-side timeout 1 s, client read timeout 1.5 s: a stream that goes
    silent without closing is abandoned after 1.5 s and reopened."""
    api.bookmark_interval = 60  # healthy streams are silent too; only timeouts end them
    api.create(web())
    sink = RecordingSink()
    source = make_source(api, watch_timeout=1, read_timeout=1.5)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        await wait_until(lambda: api.open_watches == 2)
        api.hang_streams()
        api.create(web_slice("web-a", ["10.1.0.9"]))
        took = await wait_until(lambda: sink.endpoints(HTTP) == ["10.1.0.9:8080"], timeout=5)
    assert 1.0 <= took < 3.0
    assert source.watch_restarts["endpointslices"] >= 1
    assert source.relists["endpointslices"] == 0


async def test_api_outage_keeps_serving_state_and_catches_up(
    api: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """A 30 s outage scaled to 3 s (backoff cap 0.5 s instead of 30 s): the
    known services stay, each loop logs the failure once and the recovery
    once, and the changes made meanwhile arrive after."""
    caplog.set_level(logging.INFO, logger="uproxy.kube")
    api.create(web())
    api.create(web_slice("web-a", ["10.1.0.1"]))
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        await wait_until(lambda: api.open_watches == 2)
        before = len(sink.timeline)
        await api.outage_begin()
        api.update(web_slice("web-a", ["10.1.0.1", "10.1.0.2"]))
        await asyncio.sleep(3)
        assert sink.timeline[before:] == []  # nothing removed while blind
        assert sink.endpoints(HTTP) == ["10.1.0.1:8080"]
        errors_during = dict(source.errors)
        await api.outage_end()
        took = await wait_until(
            lambda: sink.endpoints(HTTP) == ["10.1.0.1:8080", "10.1.0.2:8080"], timeout=3)
        await wait_until(lambda: not source.status()["failing"], timeout=3)
    assert took < 1.5  # backoff capped at 0.5 s
    assert errors_during["services"] >= 4 and errors_during["endpointslices"] >= 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    recoveries = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per loop
    assert len(recoveries) == 2
    assert len(sink.errors) == 2
    assert sink.timeline[before:] == [("slice", "update", "default/web-a")]


async def test_5xx_and_429_are_retried_honouring_retry_after(api: FakeKubeAPI) -> None:
    api.create(web())
    api.fail_next(3, 500)
    api.fail_next(1, 429, retry_after=1)
    sink = RecordingSink()
    source = make_source(api)
    started = time.monotonic()
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced), timeout=5)
    assert time.monotonic() - started >= 1.0
    assert sum(source.errors.values()) == 4
    # Reported once per loop when it starts failing, not once per retry.
    assert len(sink.errors) == 2 and all("HTTP 500" in e for e in sink.errors)
    assert ObjectName("default", "web") in sink.services


async def test_burst_of_1000_services(api: FakeKubeAPI) -> None:
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        await wait_until(lambda: api.open_watches == 2)
        started = time.monotonic()
        for i in range(1000):
            name = f"burst-{i}"
            api.create(service("burst", name, ports=[{"name": "p", "port": 80}],
                               cluster_ip=f"10.97.{i // 250}.{i % 250}"))
            api.create(endpoint_slice("burst", f"{name}-x", name,
                                      addresses=[f"10.2.{i // 250}.{i % 250}"],
                                      ports=[{"name": "p", "port": 8080}]))
        await wait_until(lambda: len(sink.slices) == 1000 and len(sink.services) == 1000,
                         timeout=20, what="1000 services")
        took = time.monotonic() - started
    state = desired_state(sink.services, sink.slices)
    assert len(state.ports) == 1000
    assert all(len(p.endpoints) == 1 for p in state.ports.values())
    assert took < 10, took
    print(f"1000 services + 1000 slices seen in {took:.2f}s")


async def test_named_ports_differ_between_slices(api: FakeKubeAPI) -> None:
    api.create(web())
    api.create(web_slice("web-old", ["10.1.0.1"], port=8080))
    api.create(web_slice("web-new", ["10.1.0.2"], port=9090))
    sink = RecordingSink()
    async with running(make_source(api), sink):
        await wait_until(lambda: bool(sink.synced))
        assert sink.endpoints(HTTP) == ["10.1.0.1:8080", "10.1.0.2:9090"]
        api.delete("EndpointSlice", "default", "web-old")
        await wait_until(lambda: sink.endpoints(HTTP) == ["10.1.0.2:9090"])


async def test_readiness_fallback_to_serving_terminating(api: FakeKubeAPI) -> None:
    api.create(web())
    api.create(web_slice("web-a", [], endpoints=[
        {"addresses": ["10.1.0.1"], "conditions": {"ready": False, "serving": True,
                                                   "terminating": True}},
        {"addresses": ["10.1.0.2"], "conditions": {"ready": False, "serving": False,
                                                   "terminating": True}},
    ]))
    sink = RecordingSink()
    async with running(make_source(api), sink):
        await wait_until(lambda: bool(sink.synced))
        assert sink.endpoints(HTTP) == ["10.1.0.1:8080"]  # none ready: serving+terminating
        api.create(web_slice("web-b", ["10.1.0.3"]))
        await wait_until(lambda: sink.endpoints(HTTP) == ["10.1.0.3:8080"])  # ready wins


async def test_internal_traffic_policy_local(api: FakeKubeAPI) -> None:
    api.create(web(internalTrafficPolicy="Local"))
    api.create(web_slice("web-a", [], endpoints=[
        {"addresses": ["10.1.0.1"], "conditions": {"ready": True}, "nodeName": "node-a"},
        {"addresses": ["10.1.0.2"], "conditions": {"ready": True}, "nodeName": "node-b"},
    ]))
    sink = RecordingSink()
    async with running(make_source(api), sink):
        await wait_until(lambda: bool(sink.synced))
    assert sink.endpoints(HTTP, node_name="node-a") == ["10.1.0.1:8080"]
    assert sink.endpoints(HTTP, node_name="node-c") == []
    assert sink.services[HTTP.service].internal_traffic_policy == "Local"


async def test_dual_stack_service(api: FakeKubeAPI) -> None:
    api.create(service("default", "web", ports=[{"name": "http", "port": 80}],
                       cluster_ip="10.96.0.5", clusterIPs=["10.96.0.5", "fd00:96::5"],
                       ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"))
    api.create(web_slice("web-v4", ["10.1.0.1"]))
    api.create(web_slice("web-v6", ["fd00:1::1"], address_type="IPv6"))
    sink = RecordingSink()
    async with running(make_source(api), sink):
        await wait_until(lambda: len(sink.slices) == 2)
    state = desired_state(sink.services, sink.slices)
    port = state.ports[HTTP]
    assert port.frontend.cluster_ips == ("10.96.0.5", "fd00:96::5")
    assert port.endpoints == (Endpoint("10.1.0.1", 8080), Endpoint("fd00:1::1", 8080))


async def test_namespaces_and_label_selector(api: FakeKubeAPI) -> None:
    api.create(web("team-a"))
    api.create(web("team-b"))
    api.create(service("team-a", "other", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    api.create(web_slice("web-a", ["10.1.0.1"], ns="team-a"))
    api.create(web_slice("web-b", ["10.1.0.2"], ns="team-b"))
    sink = RecordingSink()
    source = make_source(api, namespaces=["team-a"])
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        await wait_until(lambda: api.open_watches == 2)
        api.create(web("team-b", "late"))
        api.create(web("team-a", "late"))
        await wait_until(lambda: ObjectName("team-a", "late") in sink.services)
    assert sorted(map(str, sink.services)) == ["team-a/late", "team-a/web"]
    assert sorted(map(str, sink.slices)) == ["team-a/web-a"]
    assert api.count_requests(path="/api/v1/services") == 0  # only namespaced paths


async def test_bad_object_is_reported_and_the_rest_serves(api: FakeKubeAPI) -> None:
    api.create(web())
    bad = service("default", "bad", ports=[{"port": 80}])
    bad["spec"]["ports"][0]["port"] = "eighty"
    api.create(bad)
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced))
        assert list(map(str, sink.services)) == ["default/web"]
        # A good service turning bad keeps its last good version.
        broken = web()
        broken["spec"]["ports"][0]["port"] = 70000
        api.update(broken)
        await wait_until(lambda: len(sink.errors) == 2)
    assert "kube Service default/bad: spec.ports[0].port" in sink.errors[0]
    assert "spec.ports[0].port" in sink.errors[1]
    assert sink.services[ObjectName("default", "web")].ports[0].port == 80
    assert source.bad_objects["services"] == 2


async def test_cancel_closes_every_watch(api: FakeKubeAPI) -> None:
    sink = RecordingSink()
    source = make_source(api, namespaces=["a", "b"])
    async with running(source, sink):
        await wait_until(lambda: api.open_watches == 4)
    await wait_until(lambda: api.open_watches == 0, timeout=2, what="watches closed")
    assert sink.synced == ["kube"]


async def test_connection_refused_at_start_then_api_appears() -> None:
    api = FakeKubeAPI(bookmark_interval=0.2)
    await api.start()
    port = api.port
    await api.stop()  # nothing listens there now
    sink = RecordingSink()
    source = KubeSource(master=f"http://127.0.0.1:{port}", watch_timeout=2, read_timeout=3,
                        backoff_initial=0.05, backoff_cap=0.3)
    async with running(source, sink):
        await wait_until(lambda: source.errors["services"] >= 2)
        assert sink.synced == []
        assert any("cannot connect" in e for e in sink.errors)
        late = FakeKubeAPI(bookmark_interval=0.2)
        late.create(web())
        await late.start(port=port)
        try:
            await wait_until(lambda: bool(sink.synced), timeout=3)
        finally:
            await late.stop()
    assert ObjectName("default", "web") in sink.services


# ---------------------------------------------------------------- paginated lists


BIG = 1200  # services and slices: pages of 500, 500, 200


def populate(api: FakeKubeAPI, count: int = BIG) -> None:
    for i in range(count):
        name = f"svc-{i:04d}"
        api.create(service("big", name, ports=[{"name": "p", "port": 80}],
                           cluster_ip=f"10.98.{i // 250}.{i % 250}"))
        api.create(endpoint_slice("big", f"{name}-x", name,
                                  addresses=[f"10.3.{i // 250}.{i % 250}"],
                                  ports=[{"name": "p", "port": 8080}]))


def pages(calls: list[ListCall]) -> list[tuple[int | None, bool, int, int, bool]]:
    """(limit, continued, status, items, more) per LIST request."""
    return [(c.limit, c.continue_ is not None, c.status, c.items, c.more) for c in calls]


THREE_PAGES = [(500, False, 200, 500, True), (500, True, 200, 500, True),
               (500, True, 200, 200, False)]


def first_watch_version(api: FakeKubeAPI, path: str) -> str:
    for _, req_path, query in api.requests:
        if req_path == path and query.get("watch", "").lower() == "true":
            return query["resourceVersion"]
    raise AssertionError(f"no watch on {path}")


def big(name: str) -> ObjectName:
    return ObjectName("big", name)


async def test_large_lists_come_in_pages_and_the_watch_starts_at_the_snapshot(
    api: FakeKubeAPI,
) -> None:
    assert LIST_PAGE_SIZE == 500
    populate(api)
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced), timeout=10, what="first sync")
        assert (len(sink.services), len(sink.slices)) == (BIG, BIG)
        await wait_until(lambda: api.open_watches == 2)
        api.create(service("big", "after-list", ports=[{"port": 80}]))
        await wait_until(lambda: big("after-list") in sink.services)
        await asyncio.sleep(0.5)  # a few bookmarks: nothing arrives twice
    for resource, path in (("services", "/api/v1/services"),
                           ("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices")):
        calls = api.list_calls(resource)
        assert pages(calls) == THREE_PAGES
        assert len({c.resource_version for c in calls}) == 1
        assert first_watch_version(api, path) == calls[-1].resource_version
    assert source.list_pages == {"services": 3, "endpointslices": 3}
    assert source.relists == {"services": 0, "endpointslices": 0}
    keys = [(what, key) for what, _, key in sink.timeline]
    assert len(keys) == len(set(keys)) == 2 * BIG + 1  # every object once
    assert {change for _, change, _ in sink.timeline} == {"add"}
    assert sink.timeline[-1] == ("service", "add", "big/after-list")


async def test_changes_between_pages_arrive_through_the_watch(api: FakeKubeAPI) -> None:
    """The pages are a snapshot at page 1: what changes while paging is not
    in them, and the watch from the snapshot's version brings it."""
    populate(api)

    def between_pages(call: ListCall) -> None:
        if call.continue_ is not None or call.status != 200:
            return
        if call.resource == "services":
            api.create(service("big", "between", ports=[{"port": 80}]))
            api.delete("Service", "big", "svc-0700")  # on page 2, not fetched yet
            api.update(service("big", "svc-1100", ports=[{"name": "p", "port": 81}]))  # page 3
        else:
            api.create(endpoint_slice("big", "between-x", "between", addresses=["10.4.0.1"]))

    api.after_list = between_pages
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: big("between-x") in sink.slices, timeout=10)
        await wait_until(lambda: big("svc-1100") in sink.services
                         and sink.services[big("svc-1100")].ports[0].port == 81, timeout=10)
        await wait_until(lambda: big("svc-0700") not in sink.services)
    assert pages(api.list_calls("services")) == THREE_PAGES
    assert pages(api.list_calls("endpointslices")) == THREE_PAGES
    services = [(change, key) for what, change, key in sink.timeline if what == "service"]
    listed = services[:BIG]
    assert {change for change, _ in listed} == {"add"}
    assert ("add", "big/svc-0700") in listed and ("add", "big/between") not in listed
    assert services[BIG:] == [("add", "big/between"), ("delete", "big/svc-0700"),
                              ("update", "big/svc-1100")]
    slices = [(change, key) for what, change, key in sink.timeline if what == "slice"]
    assert slices[BIG:] == [("add", "big/between-x")]
    assert big("between") in sink.services and len(sink.services) == BIG


@dataclass
class ViewAtSync(RecordingSink):
    """Also keeps what the sink held when the source said it was synced."""

    at_sync: list[tuple[int, int]] = field(default_factory=list)

    def on_synced(self, source: str) -> None:
        self.at_sync.append((len(self.services), len(self.slices)))
        super().on_synced(source)


async def test_expired_continue_lists_again_and_the_sink_never_sees_a_partial_list(
    api: FakeKubeAPI,
) -> None:
    populate(api)
    sink = ViewAtSync()
    held_while_listing: list[tuple[str, int]] = []  # (resource, services the sink held)
    api.after_list = lambda call: held_while_listing.append(
        (call.resource, len(sink.services)))
    api.expire_next_continues(1, resource="services")
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced), timeout=10, what="first sync")
        await wait_until(lambda: api.open_watches == 2)
        # The first complete view has everything; nothing came before it was whole.
        assert sink.at_sync == [(BIG, BIG)]
        assert [n for resource, n in held_while_listing if resource == "services"] == [0, 0, 0]
        assert pages(api.list_calls("services")) == [
            (500, False, 200, 500, True),
            (500, True, 410, 0, False),  # the token expired ...
            (None, False, 200, BIG, False),  # ... one list without a limit, as client-go
        ]
        assert source.expired_lists == {"services": 1, "endpointslices": 0}
        before = len(sink.timeline)
        listed = len(api.list_log)
        # Blind, changes happen on pages 1 and 3; the history is compacted, so
        # the watch gets 410 and relists; its continue token expires too.
        await api.outage_begin()
        api.delete("Service", "big", "svc-0100")
        api.update(service("big", "svc-1100", ports=[{"name": "p", "port": 81}]))
        api.compact()
        api.expire_next_continues(1, resource="services")
        held_while_listing.clear()
        await api.outage_end()
        await wait_until(lambda: source.relists == {"services": 1, "endpointslices": 1},
                         what="both relists")
        await wait_until(lambda: big("svc-0100") not in sink.services)
    relist = [c for c in api.list_log[listed:] if c.resource == "services"]
    assert pages(relist)[-3:] == [(500, False, 200, 500, True), (500, True, 410, 0, False),
                                  (None, False, 200, BIG - 1, False)]
    # While the relist ran, the sink kept the whole last known state.
    assert [n for resource, n in held_while_listing if resource == "services"][-3:] == [BIG] * 3
    assert sorted(sink.timeline[before:]) == [("service", "delete", "big/svc-0100"),
                                              ("service", "update", "big/svc-1100")]
    assert source.expired_lists == {"services": 2, "endpointslices": 0}
    assert sink.at_sync == [(BIG, BIG)]


async def test_relist_after_410_on_the_watch_pages_too(api: FakeKubeAPI) -> None:
    populate(api)
    sink = RecordingSink()
    source = make_source(api)
    async with running(source, sink):
        await wait_until(lambda: bool(sink.synced), timeout=10, what="first sync")
        await wait_until(lambda: api.open_watches == 2)
        before = len(sink.timeline)
        listed = len(api.list_log)
        api.restart()  # every old resourceVersion is now 410 Gone
        await wait_until(lambda: source.relists == {"services": 1, "endpointslices": 1},
                         what="both relists")
        await wait_until(lambda: api.open_watches == 2)
        api.create(service("big", "after-relist", ports=[{"port": 80}]))
        await wait_until(lambda: big("after-relist") in sink.services)
    for resource in ("services", "endpointslices"):
        relist = [c for c in api.list_log[listed:] if c.resource == resource]
        assert pages(relist) == THREE_PAGES
        assert {c.resource_version for c in relist} == {str(api.rv - 1)}
    assert source.list_pages == {"services": 6, "endpointslices": 6}
    assert sink.timeline[before:] == [("service", "add", "big/after-relist")]


async def test_on_a_node_only_that_node_is_watched_for_its_zone_and_going_away(
        api: FakeKubeAPI) -> None:
    api.create(node("node-1", "zone-a"))
    api.create(node("node-2", "zone-b"))
    api.create(web())
    sink = RecordingSink()
    source = make_source(api, node_name="node-1")
    async with running(source, sink):
        await wait_until(lambda: sink.synced == ["kube"], what="first sync")
        assert sink.nodes == {ObjectName("", "node-1"): Node("node-1", "zone-a")}
        api.update(node("node-2", "zone-c"))  # another node: never heard of
        api.update(node("node-1", "zone-a", taints=[
            {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]))
        await wait_until(lambda: sink.nodes[ObjectName("", "node-1")].terminating,
                         what="the drain taint")
        api.delete("Node", "", "node-1")
        await wait_until(lambda: not sink.nodes, what="the node deleted")
    assert [entry for entry in sink.timeline if entry[0] == "node"] == [
        ("node", "add", "/node-1"), ("node", "update", "/node-1"),
        ("node", "delete", "/node-1")]
    node_calls = [c for c in api.requests if c[1] == "/api/v1/nodes"]
    assert node_calls and all(q.get("fieldSelector") == "metadata.name=node-1"
                              and "labelSelector" not in q for _, _, q in node_calls)


async def test_without_a_node_name_no_node_is_asked_for(api: FakeKubeAPI) -> None:
    api.create(node("node-1", "zone-a"))
    sink = RecordingSink()
    async with running(make_source(api), sink):
        await wait_until(lambda: sink.synced == ["kube"], what="first sync")
    assert not sink.nodes
    assert not [c for c in api.requests if c[1].startswith("/api/v1/nodes")]


async def test_a_forbidden_node_watch_costs_hints_not_the_sync(api: FakeKubeAPI) -> None:
    """A ClusterRole from before nodes were watched: 403 on nodes, services still serve."""
    api.forbid("nodes")
    api.create(web())
    sink = RecordingSink()
    source = make_source(api, node_name="node-1")
    async with running(source, sink):
        await wait_until(lambda: sink.synced == ["kube"], what="first sync")
        assert ObjectName("default", "web") in sink.services
        assert source.errors["nodes"] >= 1
    assert any("nodes: HTTP 403" in error for error in sink.errors)
