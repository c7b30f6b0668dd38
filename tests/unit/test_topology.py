"""Topology hints (trafficDistribution PreferSameZone/PreferSameNode/PreferClose,
topology-aware routing): which endpoints a node's cluster traffic uses.

The cases follow kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go);
the property test checks the planner against a transcription of its
CategorizeEndpoints and topologyModeFromHints, loop by loop.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
)
from uproxy.planner import desired_state, topology_mode

NODE = "node-1"
ZONE = "zone-a"
NAME = ServicePortName("default", "web", "http", "TCP")


def service(**changes: object) -> Service:
    base = Service("default", "web", ports=(ServicePortSpec("http", 80, "TCP", "http"),),
                   cluster_ips=("198.18.0.10",))
    return replace(base, **changes)  # type: ignore[arg-type]


def ep(last: int, zones: tuple[str, ...] = (), nodes: tuple[str, ...] = (), *,
       ready: bool = True, serving: bool | None = None, terminating: bool = False,
       node: str | None = None) -> SliceEndpoint:
    return SliceEndpoint((f"10.1.2.{last}",), ready=ready,
                         serving=ready if serving is None else serving,
                         terminating=terminating, node_name=node,
                         zone_hints=zones, node_hints=nodes)


def plan(endpoints: list[SliceEndpoint], *, zone: str = ZONE, node: str | None = NODE,
         svc: Service | None = None) -> tuple[list[int], list[int] | None]:
    """(last octets of the cluster endpoints, of the external ones or None)."""
    svc = svc or service()
    slice_ = EndpointSlice("default", "web-1", "web", "IPv4", (EndpointPort("http", 80),),
                           tuple(endpoints))
    port = desired_state({svc.key: svc}, {slice_.key: slice_}, node_name=node,
                         zone=zone).ports[NAME]

    def octets(found: tuple[Endpoint, ...]) -> list[int]:
        return sorted(int(e.ip.rsplit(".", 1)[1]) for e in found)

    external = port.external_endpoints
    return octets(port.endpoints), None if external is None else octets(external)


def test_zone_hints_keep_the_endpoints_for_this_nodes_zone() -> None:
    endpoints = [ep(3, ("zone-a",)), ep(4, ("zone-b",)), ep(5, ("zone-c",)),
                 ep(6, ("zone-a",))]
    assert plan(endpoints) == ([3, 6], None)


def test_an_endpoint_may_be_hinted_for_several_zones() -> None:
    endpoints = [ep(3, ("zone-b", "zone-a")), ep(4, ("zone-b",)), ep(5, ("zone-c",))]
    assert plan(endpoints) == ([3], None)


def test_a_node_without_a_zone_ignores_zone_hints() -> None:
    endpoints = [ep(3, ("zone-a",)), ep(4, ("zone-b",))]
    assert plan(endpoints, zone="") == ([3, 4], None)


def test_no_endpoint_for_this_zone_means_every_endpoint() -> None:
    endpoints = [ep(3, ("zone-a",)), ep(4, ("zone-b",))]
    assert plan(endpoints, zone="zone-c") == ([3, 4], None)


def test_one_ready_endpoint_without_hints_turns_hints_off() -> None:
    endpoints = [ep(3, ("zone-a",)), ep(4, ("zone-b",)), ep(5)]
    assert plan(endpoints) == ([3, 4, 5], None)


def test_only_ready_endpoints_decide_whether_hints_apply() -> None:
    # A terminating endpoint without hints does not turn them off, and is not used.
    endpoints = [ep(3, ("zone-a",)), ep(4, ("zone-b",)),
                 ep(5, ready=False, serving=True, terminating=True)]
    assert plan(endpoints) == ([3], None)


def test_the_terminating_fallback_ignores_hints() -> None:
    endpoints = [ep(3, ("zone-b",), ready=False, serving=True, terminating=True),
                 ep(4, ("zone-a",), ready=False, serving=True, terminating=True),
                 ep(5, ("zone-a",), ready=False, serving=False, terminating=True)]
    assert plan(endpoints) == ([3, 4], None)


def test_node_hints_win_over_zone_hints_when_one_names_this_node() -> None:
    endpoints = [ep(3, ("zone-a",), (NODE,)), ep(4, ("zone-a",), ("node-2",)),
                 ep(5, ("zone-b",), ("node-3",))]
    assert plan(endpoints) == ([3], None)


def test_node_hints_for_other_nodes_fall_back_to_zone_hints() -> None:
    endpoints = [ep(3, ("zone-a",), ("node-2",)), ep(4, ("zone-a",), ("node-2",)),
                 ep(5, ("zone-b",), ("node-3",))]
    assert plan(endpoints) == ([3, 4], None)


def test_node_hints_missing_on_one_endpoint_fall_back_to_zone_hints() -> None:
    endpoints = [ep(3, ("zone-a",), (NODE,)), ep(4, ("zone-a",)), ep(5, ("zone-b",))]
    assert plan(endpoints) == ([3, 4], None)


def test_traffic_policy_local_ignores_hints() -> None:
    endpoints = [ep(3, ("zone-b",), node=NODE), ep(4, ("zone-a",), node="node-2")]
    assert plan(endpoints, svc=service(internal_traffic_policy="Local")) == ([3], None)


def test_external_policy_local_ignores_hints_for_external_traffic_only() -> None:
    endpoints = [ep(3, ("zone-b",), node=NODE), ep(4, ("zone-a",), node="node-2")]
    svc = service(type="NodePort", external_traffic_policy="Local")
    assert plan(endpoints, svc=svc) == ([4], [3])


def test_topology_mode_names_the_hints_used() -> None:
    assert topology_mode([ep(3, ("zone-a",), (NODE,))], ZONE, NODE) == "node"
    assert topology_mode([ep(3, ("zone-a",), ("node-2",))], ZONE, NODE) == "zone"
    assert topology_mode([ep(3, ("zone-b",))], ZONE, NODE) == ""
    assert topology_mode([], ZONE, NODE) == ""


# --- against a transcription of kube-proxy's CategorizeEndpoints ------------------------


def kube_proxy_cluster_endpoints(endpoints: list[SliceEndpoint], node: str,
                                 zone: str) -> set[str]:
    """pkg/proxy/topology.go, policy Cluster, written as its loops are."""
    has_endpoint_for_node, all_have_node_hints = False, True
    has_endpoint_for_zone, all_have_zone_hints = False, True
    for endpoint in endpoints:
        if not endpoint.ready:
            continue
        if len(endpoint.zone_hints) == 0:
            all_have_zone_hints = False
        elif zone in endpoint.zone_hints:
            has_endpoint_for_zone = True
        if len(endpoint.node_hints) == 0:
            all_have_node_hints = False
        elif node in endpoint.node_hints:
            has_endpoint_for_node = True
    mode = ""
    if all_have_node_hints and has_endpoint_for_node:
        mode = "hostname"
    elif all_have_zone_hints and has_endpoint_for_zone:
        mode = "zone"

    def available(endpoint: SliceEndpoint) -> bool:
        if mode == "hostname":
            return node in endpoint.node_hints
        if mode == "zone":
            return zone in endpoint.zone_hints
        return True

    cluster = [e for e in endpoints if e.ready and available(e)]
    if not cluster:
        cluster = [e for e in endpoints if e.serving and e.terminating]
    return {e.addresses[0] for e in cluster}


_ZONES = st.lists(st.sampled_from(["zone-a", "zone-b", "zone-c"]), max_size=2, unique=True)
_NODES = st.lists(st.sampled_from([NODE, "node-2"]), max_size=2, unique=True)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(_ZONES, _NODES, st.booleans(), st.booleans(), st.booleans()),
             max_size=7),
    st.sampled_from(["", "zone-a", "zone-b", "zone-d"]),
)
def test_hint_filtering_agrees_with_kube_proxy(
    drawn: list[tuple[list[str], list[str], bool, bool, bool]], zone: str,
) -> None:
    endpoints = [ep(i, tuple(zones), tuple(nodes), ready=is_ready, serving=serving,
                    terminating=is_terminating)
                 for i, (zones, nodes, is_ready, serving, is_terminating)
                 in enumerate(drawn, start=1)]
    cluster, external = plan(endpoints, zone=zone)
    expected = kube_proxy_cluster_endpoints(endpoints, NODE, zone)
    assert {f"10.1.2.{n}" for n in cluster} == expected
    assert external is None
