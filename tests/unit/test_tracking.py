"""ChangeTracker timelines, ported from kube-proxy's service change tracker
tests (pkg/proxy/service_test.go: TestBuildServiceMapAddRemove,
TestBuildServiceMapServiceUpdate, TestServiceCacheLeaks; userspace
TestOnServiceAddChangeMap) and extended to EndpointSlices.

Each test reads as: these events arrive, the sync takes the net changes,
the proxier's maps end up like this.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.model import (
    EndpointPort,
    EndpointSlice,
    ObjectName,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)
from uproxy.planner import desired_state
from uproxy.sources.base import SourceSink
from uproxy.tracking import Changes, ChangeTracker


def svc(namespace: str, name: str, ip: str, *ports: tuple[str, str, int, int, int]) -> Service:
    """ports: (name, protocol, port, targetPort, nodePort) as kube-proxy's addTestPort."""
    specs = tuple(
        ServicePortSpec(n, port, proto, target, node or None)
        for n, proto, port, target, node in ports
    )
    return Service(namespace, name, ports=specs, cluster_ips=(ip,))


def eps(namespace: str, name: str, service: str, *ips: str, port: int = 80) -> EndpointSlice:
    return EndpointSlice(
        namespace,
        name,
        service,
        ports=(EndpointPort("", port),),
        endpoints=tuple(SliceEndpoint((ip,)) for ip in ips),
    )


class Proxier:
    """What the real proxier does with the tracker: take, apply, count."""

    def __init__(self) -> None:
        self.requests = 0
        self.tracker = ChangeTracker(notify=self.request)
        self.services: dict[ObjectName, Service] = {}
        self.slices: dict[ObjectName, EndpointSlice] = {}

    def request(self) -> None:
        self.requests += 1

    def sync(self) -> Changes:
        changes = self.tracker.take()
        changes.apply_to(self.services, self.slices)
        return changes


def test_tracker_is_a_source_sink() -> None:
    sink: SourceSink = ChangeTracker()
    sink.on_synced("file")
    assert isinstance(sink, ChangeTracker)
    assert sink.synced("file")


def test_build_service_map_add_remove() -> None:
    p = Proxier()
    services = [
        svc("ns2", "cluster-ip", "172.16.55.4", ("port1", "UDP", 1234, 4321, 0),
            ("port2", "UDP", 1235, 5321, 0)),
        replace(
            svc("ns2", "node-port", "172.16.55.10", ("port1", "UDP", 345, 678, 0),
                ("port2", "TCP", 344, 677, 0)),
            type="NodePort",
        ),
        replace(
            svc("ns1", "load-balancer", "172.16.55.11", ("foobar", "UDP", 8675, 30061, 7000),
                ("baz", "UDP", 8676, 30062, 7001)),
            type="LoadBalancer", load_balancer_ips=("10.1.2.4",),
        ),
        replace(
            svc("ns1", "only-local-load-balancer", "172.16.55.12",
                ("foobar2", "UDP", 8677, 30063, 7002), ("baz", "UDP", 8678, 30064, 7003)),
            type="LoadBalancer", load_balancer_ips=("10.1.2.3",),
            external_traffic_policy="Local",
        ),
    ]
    for service in services:
        p.tracker.on_service(None, service)

    changes = p.sync()
    assert set(changes.services) == {s.key for s in services}
    assert len(p.services) == 4
    assert len(desired_state(p.services, p.slices).ports) == 8

    # Remove some stuff: the first service loses its first port, the rest go.
    one_service = svc("ns2", "cluster-ip", "172.16.55.4", ("p2", "UDP", 1235, 5321, 0))
    p.tracker.on_service(services[0], one_service)
    for service in services[1:]:
        p.tracker.on_service(service, None)

    changes = p.sync()
    assert len(changes.services) == 4
    assert changes.services[services[0].key] == (services[0], one_service)
    assert all(changes.services[s.key] == (s, None) for s in services[1:])
    assert p.services == {one_service.key: one_service}
    assert len(desired_state(p.services, p.slices).ports) == 1


def test_build_service_map_service_update() -> None:
    p = Proxier()
    v1 = svc("ns1", "svc1", "172.16.55.4", ("p1", "UDP", 1234, 4321, 0),
             ("p2", "TCP", 1235, 5321, 0))
    v2 = replace(
        svc("ns1", "svc1", "172.16.55.4", ("p1", "UDP", 1234, 4321, 7002),
            ("p2", "TCP", 1235, 5321, 7003)),
        type="LoadBalancer", load_balancer_ips=("10.1.2.3",), external_traffic_policy="Local",
    )

    p.tracker.on_service(None, v1)
    assert len(p.sync().services) == 1
    assert len(desired_state(p.services, p.slices).ports) == 2

    # Change the service to a load balancer.
    p.tracker.on_service(v1, v2)
    assert p.sync().services == {v1.key: (v1, v2)}
    assert p.services[v1.key] == v2

    # No change: no updated services.
    p.tracker.on_service(v2, v2)
    assert p.sync().empty
    assert p.services[v1.key] == v2

    # And back to ClusterIP.
    p.tracker.on_service(v2, v1)
    assert p.sync().services == {v1.key: (v2, v1)}
    assert p.services[v1.key] == v1


def test_service_cache_leaks() -> None:
    """An add then a delete before any sync leaves nothing pending."""
    p = Proxier()
    service = svc("ns1", "svc1", "172.16.55.4", ("p1", "UDP", 1234, 4321, 0))
    p.tracker.on_service(None, service)
    assert p.tracker.pending
    p.tracker.on_service(service, None)
    assert not p.tracker.pending
    assert p.sync().empty
    assert p.services == {}


def test_on_service_add_change_map() -> None:
    """kube-proxy userspace: add, update (port changed), update back, delete."""
    p = Proxier()
    base = svc("testnamespace", "testname", "1.2.3.4", ("p", "TCP", 0, 0, 0))
    changed = svc("testnamespace", "testname", "1.2.3.4", ("p", "TCP", 99, 0, 0))

    p.tracker.on_service(None, base)
    assert p.sync().services == {base.key: (None, base)}

    # Changed and changed back before the sync: nothing.
    p.tracker.on_service(base, changed)
    p.tracker.on_service(changed, base)
    assert p.sync().empty

    # Changed, changed back, changed again: one change from the oldest.
    p.tracker.on_service(base, changed)
    p.tracker.on_service(changed, base)
    p.tracker.on_service(base, changed)
    assert p.sync().services == {base.key: (base, changed)}

    p.tracker.on_service(changed, None)
    assert p.sync().services == {base.key: (changed, None)}
    assert p.services == {}


def test_many_updates_are_one_change_from_oldest_to_newest() -> None:
    p = Proxier()
    versions = [svc("ns", "web", f"10.0.0.{i}", ("http", "TCP", 80, 8080, 0)) for i in range(1, 6)]
    p.tracker.on_service(None, versions[0])
    p.sync()
    for older, newer in itertools.pairwise(versions):
        p.tracker.on_service(older, newer)
    changes = p.sync()
    assert changes.services == {versions[0].key: (versions[0], versions[-1])}


def test_add_then_updates_then_delete_is_nothing() -> None:
    p = Proxier()
    a = svc("ns", "web", "10.0.0.1", ("http", "TCP", 80, 8080, 0))
    b = svc("ns", "web", "10.0.0.2", ("http", "TCP", 80, 8080, 0))
    p.tracker.on_service(None, a)
    p.tracker.on_service(a, b)
    p.tracker.on_service(b, None)
    assert p.sync().empty


def test_delete_then_re_add_same_object_is_nothing_and_changed_is_an_update() -> None:
    p = Proxier()
    a = svc("ns", "web", "10.0.0.1", ("http", "TCP", 80, 8080, 0))
    b = svc("ns", "web", "10.0.0.2", ("http", "TCP", 80, 8080, 0))
    p.tracker.on_service(None, a)
    p.sync()
    p.tracker.on_service(a, None)
    p.tracker.on_service(None, a)
    assert p.sync().empty
    p.tracker.on_service(a, None)
    p.tracker.on_service(None, b)
    assert p.sync().services == {a.key: (a, b)}
    assert p.services == {a.key: b}


def test_slices_are_tracked_apart_from_services() -> None:
    p = Proxier()
    service = svc("ns", "web", "10.0.0.1", ("", "TCP", 80, 8080, 0))
    slice_a = eps("ns", "web-abc", "web", "10.1.0.1", port=8080)
    slice_a2 = eps("ns", "web-abc", "web", "10.1.0.1", "10.1.0.2", port=8080)
    slice_b = eps("ns", "web-def", "web", "10.1.0.3", port=8080)
    # A slice and a service with the same namespace/name are different objects.
    same_name = eps("ns", "web", "web", "10.1.0.9", port=8080)

    p.tracker.on_service(None, service)
    p.tracker.on_slice(None, slice_a)
    p.tracker.on_slice(slice_a, slice_a2)
    p.tracker.on_slice(None, slice_b)
    p.tracker.on_slice(None, same_name)
    changes = p.sync()
    assert changes.services == {service.key: (None, service)}
    assert changes.slices == {
        slice_a.key: (None, slice_a2),
        slice_b.key: (None, slice_b),
        same_name.key: (None, same_name),
    }
    assert changes.touched_services() == {ObjectName("ns", "web")}
    endpoints = next(iter(desired_state(p.services, p.slices).ports.values())).endpoints
    assert [e.ip for e in endpoints] == ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"]

    p.tracker.on_slice(slice_b, None)
    changes = p.sync()
    assert changes.services == {}
    assert changes.slices == {slice_b.key: (slice_b, None)}
    assert set(p.slices) == {slice_a.key, same_name.key}


def test_notify_is_called_for_recorded_changes_and_first_sync_only() -> None:
    p = Proxier()
    a = svc("ns", "web", "10.0.0.1", ("", "TCP", 80, 8080, 0))
    p.tracker.on_service(None, a)
    assert p.requests == 1
    p.tracker.on_service(a, a)  # no change at all
    assert p.requests == 1
    p.tracker.on_slice(None, eps("ns", "web-1", "web", "10.1.0.1"))
    assert p.requests == 2
    p.tracker.on_synced("kube-services")
    p.tracker.on_synced("kube-services")  # a relist is not news
    assert p.requests == 3
    assert p.tracker.synced("kube-services")
    assert not p.tracker.synced("kube-services", "kube-endpointslices")
    p.tracker.on_synced("kube-endpointslices")
    assert p.tracker.synced("kube-services", "kube-endpointslices")
    assert p.tracker.synced_sources == {"kube-services", "kube-endpointslices"}


def test_source_errors_keep_the_last_message_and_a_count() -> None:
    tracker = ChangeTracker()
    assert tracker.errors == {}
    tracker.on_source_error("file", "services.yaml:3: services[0].ports: missing")
    tracker.on_source_error("file", "services.yaml:7: services[1].name: missing")
    tracker.on_source_error("kube", "watch dropped")
    assert tracker.errors["file"].message == "services.yaml:7: services[1].name: missing"
    assert tracker.errors["file"].count == 2
    assert tracker.errors["kube"].count == 1
    assert not tracker.pending


def test_take_hands_over_and_starts_empty() -> None:
    tracker = ChangeTracker()
    a = svc("ns", "web", "10.0.0.1", ("", "TCP", 80, 8080, 0))
    tracker.on_service(None, a)
    first = tracker.take()
    assert not tracker.pending
    tracker.on_service(a, None)
    # Changes already taken are not altered by later events.
    assert first.services == {a.key: (None, a)}
    assert tracker.take().services == {a.key: (a, None)}


# A random event stream, as a source would send it, folded by the tracker and
# applied in random-sized batches, must leave the proxier's maps equal to the
# source's final view.
_NAMES = [ObjectName("ns", n) for n in ("a", "b", "c")]
_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from([None, *_IPS]), st.booleans()),
        max_size=40,
    )
)
def test_folded_changes_reach_the_sources_final_view(
    events: list[tuple[ObjectName, str | None, bool]],
) -> None:
    p = Proxier()
    truth: dict[ObjectName, Service] = {}
    for key, ip, sync_now in events:
        previous = truth.get(key)
        current = None if ip is None else svc(key.namespace, key.name, ip, ("", "TCP", 80, 0, 0))
        if previous is None and current is None:
            continue
        if current is None:
            del truth[key]
        else:
            truth[key] = current
        p.tracker.on_service(previous, current)
        if sync_now:
            before = dict(p.services)
            changes = p.sync()
            for name, (old, new) in changes.services.items():
                assert old == before.get(name)
                assert old != new
    p.sync()
    assert p.services == truth
