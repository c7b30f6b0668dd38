"""Planner: which service ports exist, with which endpoints, and what changed."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.model import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    DesiredPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Frontend,
    ObjectName,
    Service,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
)
from uproxy.planner import (
    DesiredState,
    desired_state,
    diff,
    skip_reason,
    slices_by_service,
    update_state,
)

NS = "default"
NODE = "node-a"


def service(name: str = "web", **changes: object) -> Service:
    base = Service(
        NS,
        name,
        ports=(ServicePortSpec("http", 80, "TCP", "http"),),
        cluster_ips=("198.18.0.10",),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def ready(ip: str, node: str | None = None) -> SliceEndpoint:
    return SliceEndpoint((ip,), ready=True, serving=True, terminating=False, node_name=node)


def terminating(ip: str, node: str | None = None, serving: bool = True) -> SliceEndpoint:
    return SliceEndpoint((ip,), ready=False, serving=serving, terminating=True, node_name=node)


def not_ready(ip: str, node: str | None = None) -> SliceEndpoint:
    return SliceEndpoint((ip,), ready=False, serving=False, terminating=False, node_name=node)


def eps(
    name: str,
    *endpoints: SliceEndpoint,
    service_name: str = "web",
    ports: tuple[EndpointPort, ...] = (EndpointPort("http", 8080),),
    address_type: str = "IPv4",
    namespace: str = NS,
) -> EndpointSlice:
    return EndpointSlice(namespace, name, service_name, address_type, ports, endpoints)


def plan(
    services: list[Service], slices: list[EndpointSlice], node_name: str | None = None
) -> DesiredState:
    return desired_state(
        {s.key: s for s in services}, {s.key: s for s in slices}, node_name=node_name
    )


def port(name: str = "http", svc: str = "web", protocol: str = "TCP") -> ServicePortName:
    return ServicePortName(NS, svc, name, protocol)


def ips(state: DesiredState, name: ServicePortName | None = None) -> list[str]:
    return [str(e) for e in state.ports[name or port()].endpoints]


# --- desired_state: which services are proxied --------------------------------


def test_skip_reasons() -> None:
    assert skip_reason(service()) is None
    assert skip_reason(service(type="ExternalName")) == "ExternalName service"
    assert "another proxy" in (
        skip_reason(service(labels={SERVICE_PROXY_NAME_LABEL: "cilium"})) or ""
    )
    assert skip_reason(service(labels={HEADLESS_LABEL: ""})) == "headless service"
    assert skip_reason(service(cluster_ips=("None",))) == "headless service"


def test_a_service_proxy_name_serves_only_services_labelled_with_it() -> None:
    ours = service(labels={SERVICE_PROXY_NAME_LABEL: "uproxy"})
    theirs = service(labels={SERVICE_PROXY_NAME_LABEL: "cilium"})
    assert skip_reason(ours, "uproxy") is None
    assert skip_reason(theirs, "uproxy") == (
        f"not labelled {SERVICE_PROXY_NAME_LABEL}=uproxy")
    assert skip_reason(service(), "uproxy") == f"not labelled {SERVICE_PROXY_NAME_LABEL}=uproxy"
    assert "another proxy" in (skip_reason(ours) or "")  # without the flag, as kube-proxy
    headless = service(labels={SERVICE_PROXY_NAME_LABEL: "uproxy"}, cluster_ips=("None",))
    assert skip_reason(headless, "uproxy") == "headless service"


def test_skipped_services_get_no_ports_and_say_why() -> None:
    services = [
        service("external", type="ExternalName"),
        service("headless", cluster_ips=("None",)),
        service("elsewhere", labels={SERVICE_PROXY_NAME_LABEL: "other"}),
        service("web"),
    ]
    state = plan(services, [eps("web-1", ready("10.1.0.1"))])
    assert list(state.ports) == [port()]
    assert set(state.skipped) == {
        ObjectName(NS, "external"), ObjectName(NS, "headless"), ObjectName(NS, "elsewhere")
    }
    assert state.skipped[ObjectName(NS, "external")] == "ExternalName service"


def test_unsupported_protocol_skips_that_port_only() -> None:
    svc = service(
        ports=(ServicePortSpec("sctp", 9, "SCTP"), ServicePortSpec("http", 80, "TCP", "http"))
    )
    state = plan([svc], [eps("web-1", ready("10.1.0.1"))])
    assert list(state.ports) == [port()]
    assert state.skipped[svc.key] == "protocol SCTP is not proxied"


def test_service_without_cluster_ip_is_planned_for_bind_range_mode() -> None:
    state = plan([service(cluster_ips=())], [eps("web-1", ready("10.1.0.1"))])
    assert state.ports[port()].frontend.cluster_ips == ()
    assert ips(state) == ["10.1.0.1:8080"]


def test_frontend_carries_every_address_and_node_port() -> None:
    svc = service(
        type="LoadBalancer",
        ports=(ServicePortSpec("http", 80, "TCP", "http", node_port=30080),),
        external_ips=("198.18.5.5",),
        load_balancer_ips=("198.18.6.6",),
    )
    frontend = plan([svc], []).ports[port()].frontend
    assert frontend == Frontend(
        name=port(),
        port=80,
        protocol="TCP",
        cluster_ips=("198.18.0.10",),
        node_port=30080,
        external_ips=("198.18.5.5",),
        load_balancer_ips=("198.18.6.6",),
    )
    assert frontend.addresses == ("198.18.0.10", "198.18.5.5", "198.18.6.6")


def test_a_service_without_slices_has_a_port_with_no_endpoints() -> None:
    state = plan([service()], [])
    assert state.ports[port()].endpoints == ()


# --- desired_state: which endpoints -------------------------------------------


def test_ready_endpoints_only_when_any_is_ready() -> None:
    state = plan(
        [service()],
        [eps("web-1", ready("10.1.0.2"), not_ready("10.1.0.3"), terminating("10.1.0.4"),
             ready("10.1.0.1"))],
    )
    assert ips(state) == ["10.1.0.1:8080", "10.1.0.2:8080"]


def test_falls_back_to_serving_terminating_when_none_is_ready() -> None:
    state = plan(
        [service()],
        [eps("web-1", terminating("10.1.0.1"), terminating("10.1.0.2", serving=False),
             not_ready("10.1.0.3"))],
    )
    assert ips(state) == ["10.1.0.1:8080"]


def test_fallback_looks_at_all_slices_of_the_service() -> None:
    """A ready endpoint in one slice wins over terminating ones in another."""
    state = plan(
        [service()],
        [eps("web-1", ready("10.1.0.1")), eps("web-2", terminating("10.1.0.2"))],
    )
    assert ips(state) == ["10.1.0.1:8080"]


def test_named_port_resolves_per_slice() -> None:
    slices = [
        eps("web-1", ready("10.1.0.1"), ports=(EndpointPort("http", 8080),)),
        eps("web-2", ready("10.1.0.2"), ports=(EndpointPort("http", 9090),)),
        # Same name, other protocol; and another name: neither belongs to http/TCP.
        eps("web-3", ready("10.1.0.3"), ports=(EndpointPort("http", 7070, "UDP"),
                                               EndpointPort("metrics", 9100))),
    ]
    assert ips(plan([service()], slices)) == ["10.1.0.1:8080", "10.1.0.2:9090"]


def test_two_ports_of_one_service() -> None:
    svc = service(
        ports=(ServicePortSpec("http", 80, "TCP", "http"), ServicePortSpec("dns", 53, "UDP", 53))
    )
    slices = [
        eps("web-1", ready("10.1.0.1"),
            ports=(EndpointPort("http", 8080), EndpointPort("dns", 5353, "UDP"))),
    ]
    state = plan([svc], slices)
    assert ips(state, port("http")) == ["10.1.0.1:8080"]
    assert ips(state, port("dns", protocol="UDP")) == ["10.1.0.1:5353"]


def test_unnamed_single_port() -> None:
    svc = service(ports=(ServicePortSpec("", 80, "TCP", 8080),))
    state = plan([svc], [eps("web-1", ready("10.1.0.1"), ports=(EndpointPort("", 8080),))])
    assert ips(state, port("")) == ["10.1.0.1:8080"]


def test_same_endpoint_in_two_slices_is_listed_once() -> None:
    state = plan(
        [service()],
        [eps("web-1", ready("10.1.0.1")), eps("web-2", ready("10.1.0.1"), ready("10.1.0.0"))],
    )
    assert ips(state) == ["10.1.0.0:8080", "10.1.0.1:8080"]


def test_slices_of_other_services_and_namespaces_do_not_leak() -> None:
    slices = [
        eps("web-1", ready("10.1.0.1")),
        eps("api-1", ready("10.1.0.2"), service_name="api"),
        eps("web-x", ready("10.1.0.3"), namespace="other"),
        eps("web-e", SliceEndpoint(()), ),  # an endpoint without an address
    ]
    assert ips(plan([service()], slices)) == ["10.1.0.1:8080"]


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints() -> None:
    svc = service(internal_traffic_policy="Local")
    slices = [eps("web-1", ready("10.1.0.1", NODE), ready("10.1.0.2", "node-b"),
                  ready("10.1.0.3"))]
    assert ips(plan([svc], slices, node_name=NODE)) == ["10.1.0.1:8080"]
    # Without knowing the node, no endpoint is local.
    assert ips(plan([svc], slices, node_name=None)) == []
    # Cluster policy ignores nodes.
    assert len(ips(plan([service()], slices, node_name=NODE))) == 3


def test_local_policy_falls_back_to_local_terminating_even_if_remote_is_ready() -> None:
    """kube-proxy's CategorizeEndpoints: filter to local first, then fall back."""
    svc = service(internal_traffic_policy="Local")
    slices = [eps("web-1", ready("10.1.0.2", "node-b"), terminating("10.1.0.1", NODE),
                  terminating("10.1.0.3", "node-b"))]
    assert ips(plan([svc], slices, node_name=NODE)) == ["10.1.0.1:8080"]


# --- externalTrafficPolicy: Local ----------------------------------------------

EXTERNAL = {"type": "NodePort", "ports": (ServicePortSpec("http", 80, "TCP", "http", 30080),)}


def external_ips(state: DesiredState) -> list[str] | None:
    external = state.ports[port()].external_endpoints
    return None if external is None else [str(e) for e in external]


def test_external_policy_local_limits_only_external_traffic_to_this_node() -> None:
    """Timeline: a NodePort service, one endpoint here, one on node-b."""
    svc = service(external_traffic_policy="Local", **EXTERNAL)
    slices = [eps("web-1", ready("10.1.0.1", NODE), ready("10.1.0.2", "node-b"))]
    state = plan([svc], slices, node_name=NODE)
    assert ips(state) == ["10.1.0.1:8080", "10.1.0.2:8080"]  # cluster IP: every endpoint
    assert external_ips(state) == ["10.1.0.1:8080"]  # node port, external IPs: this node's
    # With no endpoint here, external traffic has none (it is refused), cluster traffic still goes.
    remote_only = [eps("web-1", ready("10.1.0.2", "node-b"))]
    state = plan([svc], remote_only, node_name=NODE)
    assert ips(state) == ["10.1.0.2:8080"]
    assert external_ips(state) == []
    # Not knowing this node's name, nothing is local.
    assert external_ips(plan([svc], slices, node_name=None)) == []


def test_external_policy_applies_to_externally_accessible_services_only() -> None:
    slices = [eps("web-1", ready("10.1.0.1", NODE), ready("10.1.0.2", "node-b"))]
    cluster_only = service(external_traffic_policy="Local")
    assert external_ips(plan([cluster_only], slices, node_name=NODE)) is None
    with_external_ip = service(external_traffic_policy="Local", external_ips=("198.18.2.10",))
    assert external_ips(plan([with_external_ip], slices, node_name=NODE)) == ["10.1.0.1:8080"]
    load_balancer = service(external_traffic_policy="Local", type="LoadBalancer",
                            load_balancer_ips=("198.18.2.11",))
    assert external_ips(plan([load_balancer], slices, node_name=NODE)) == ["10.1.0.1:8080"]
    assert external_ips(plan([service(**EXTERNAL)], slices, node_name=NODE)) is None


def test_external_endpoints_are_none_when_both_kinds_of_traffic_agree() -> None:
    svc = service(external_traffic_policy="Local", **EXTERNAL)
    all_here = [eps("web-1", ready("10.1.0.1", NODE), ready("10.1.0.2", NODE))]
    assert external_ips(plan([svc], all_here, node_name=NODE)) is None
    both_local = replace(svc, internal_traffic_policy="Local")
    mixed = [eps("web-1", ready("10.1.0.1", NODE), ready("10.1.0.2", "node-b"))]
    state = plan([both_local], mixed, node_name=NODE)
    assert ips(state) == ["10.1.0.1:8080"] and external_ips(state) is None


def test_internal_local_external_cluster_sends_external_traffic_everywhere() -> None:
    """kube-proxy: external traffic follows externalTrafficPolicy, not the internal one."""
    svc = service(internal_traffic_policy="Local", **EXTERNAL)
    slices = [eps("web-1", ready("10.1.0.1", NODE), ready("10.1.0.2", "node-b"))]
    state = plan([svc], slices, node_name=NODE)
    assert ips(state) == ["10.1.0.1:8080"]
    assert external_ips(state) == ["10.1.0.1:8080", "10.1.0.2:8080"]


def test_external_local_falls_back_to_local_terminating_endpoints() -> None:
    svc = service(external_traffic_policy="Local", **EXTERNAL)
    slices = [eps("web-1", ready("10.1.0.2", "node-b"), terminating("10.1.0.1", NODE),
                  terminating("10.1.0.3", NODE, serving=False))]
    state = plan([svc], slices, node_name=NODE)
    assert ips(state) == ["10.1.0.2:8080"]
    assert external_ips(state) == ["10.1.0.1:8080"]


_NODES = st.sampled_from([None, NODE, "node-b"])
_CONDITIONS = st.sampled_from([ready, terminating, not_ready])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), _NODES, _CONDITIONS), max_size=6),
    st.sampled_from(["Cluster", "Local"]),
    st.sampled_from(["Cluster", "Local"]),
    st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
    st.booleans(),
    st.sampled_from([None, NODE]),
)
def test_traffic_policies_pick_each_kind_of_traffic_from_the_right_nodes(
    drawn: list[tuple[int, str | None, object]], internal: str, external: str,
    service_type: str, with_external_ip: bool, node_name: str | None,
) -> None:
    svc = service(internal_traffic_policy=internal, external_traffic_policy=external,
                  type=service_type,
                  external_ips=("198.18.2.10",) if with_external_ip else ())
    endpoints = [make(f"10.1.0.{n}", node) for n, node, make in drawn]  # type: ignore[operator]
    state = plan([svc], [eps("web-1", *endpoints)], node_name=node_name)
    result = state.ports[port()]

    def expected(local: bool) -> tuple[Endpoint, ...]:
        chosen = [e for e in endpoints if not local or (node_name and e.node_name == node_name)]
        use = [e for e in chosen if e.ready] or [e for e in chosen if e.serving and e.terminating]
        return tuple(sorted({Endpoint(e.addresses[0], 8080) for e in use}))

    assert result.endpoints == expected(internal == "Local")
    reachable = service_type != "ClusterIP" or with_external_ip
    external_set = expected(external == "Local") if reachable else result.endpoints
    if external_set == result.endpoints:
        assert result.external_endpoints is None
    else:
        assert result.external_endpoints == external_set


def test_ipv4_service_ignores_ipv6_and_fqdn_slices() -> None:
    slices = [
        eps("web-4", ready("10.1.0.1")),
        eps("web-6", ready("fd00::1"), address_type="IPv6"),
        eps("web-f", ready("web.example"), address_type="FQDN"),
    ]
    assert ips(plan([service()], slices)) == ["10.1.0.1:8080"]


def test_ipv6_service_takes_ipv6_slices() -> None:
    slices = [eps("web-4", ready("10.1.0.1")), eps("web-6", ready("fd00::1"), address_type="IPv6")]
    state = plan([service(cluster_ips=("fd00:18::10",))], slices)
    assert ips(state) == ["[fd00::1]:8080"]


def test_dual_stack_service_takes_both_families() -> None:
    slices = [eps("web-4", ready("10.1.0.1")), eps("web-6", ready("fd00::1"), address_type="IPv6")]
    state = plan([service(cluster_ips=("198.18.0.10", "fd00:18::10"))], slices)
    assert ips(state) == ["10.1.0.1:8080", "[fd00::1]:8080"]
    assert state.ports[port()].frontend.cluster_ips == ("198.18.0.10", "fd00:18::10")


def test_affinity() -> None:
    assert plan([service()], []).ports[port()].affinity_timeout is None
    sticky = plan([service(session_affinity="ClientIP")], []).ports[port()]
    assert sticky.affinity_timeout == 10800.0
    short = plan([service(session_affinity="ClientIP", affinity_timeout=60)], [])
    assert short.ports[port()].affinity_timeout == 60.0


# --- diff -----------------------------------------------------------------------


def desired(
    name: str = "web", endpoints: tuple[str, ...] = ("10.1.0.1",), number: int = 80,
    affinity: float | None = None, cluster_ip: str = "198.18.0.10",
) -> DesiredPort:
    spn = port(svc=name)
    return DesiredPort(
        Frontend(spn, number, "TCP", (cluster_ip,)),
        tuple(Endpoint(ip, 8080) for ip in endpoints),
        affinity,
    )


def by_name(*ports: DesiredPort) -> dict[ServicePortName, DesiredPort]:
    return {p.name: p for p in ports}


def test_diff_from_nothing_adds_everything_sorted() -> None:
    b, a = desired("b"), desired("a")
    result = diff({}, by_name(b, a))
    assert result.added == (a, b)
    assert result.updated == () and result.removed == ()
    assert dict(result.desired) == by_name(a, b)
    assert not result.empty


def test_diff_of_equal_states_is_empty() -> None:
    state = by_name(desired("a"), desired("b"))
    result = diff(state, dict(state))
    assert result.empty
    assert dict(result.desired) == state


def test_diff_endpoints_or_affinity_change_is_an_update() -> None:
    old = desired("a")
    more = desired("a", endpoints=("10.1.0.1", "10.1.0.2"))
    sticky = desired("a", affinity=10800.0)
    assert diff(by_name(old), by_name(more)).updated == (more,)
    assert diff(by_name(old), by_name(sticky)).updated == (sticky,)
    assert diff(by_name(old), by_name(more)).added == ()
    assert diff(by_name(old), by_name(more)).removed == ()


def test_diff_frontend_change_is_remove_then_add() -> None:
    old = desired("a")
    for new in (desired("a", number=81), desired("a", cluster_ip="198.18.0.11")):
        result = diff(by_name(old), by_name(new))
        assert result.removed == (old,)
        assert result.added == (new,)
        assert result.updated == ()


def test_diff_removed_service() -> None:
    a, b = desired("a"), desired("b")
    result = diff(by_name(a, b), by_name(b))
    assert result.removed == (a,)
    assert result.added == () and result.updated == ()


def test_diff_of_a_whole_timeline() -> None:
    """Service objects in, plan out: add, scale, re-port, delete."""
    web = service()
    s1 = eps("web-1", ready("10.1.0.1"))
    first = plan([web], [s1]).ports
    assert [p.name for p in diff({}, first).added] == [port()]

    scaled = plan([web], [eps("web-1", ready("10.1.0.1"), ready("10.1.0.2"))]).ports
    step = diff(first, scaled)
    assert [str(e) for e in step.updated[0].endpoints] == ["10.1.0.1:8080", "10.1.0.2:8080"]

    moved = plan([service(ports=(ServicePortSpec("http", 8000, "TCP", "http"),))], [s1]).ports
    step = diff(scaled, moved)
    assert step.removed[0].frontend.port == 80
    assert step.added[0].frontend.port == 8000

    gone = diff(moved, plan([], [s1]).ports)
    assert gone.removed == (moved[port()],)


_port_strategy = st.builds(
    desired,
    name=st.sampled_from(["a", "b", "c", "d"]),
    endpoints=st.lists(st.sampled_from(["10.1.0.1", "10.1.0.2"]), max_size=2, unique=True)
    .map(tuple),
    number=st.sampled_from([80, 81]),
    affinity=st.sampled_from([None, 60.0]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_port_strategy), st.lists(_port_strategy))
def test_applying_the_plan_reaches_the_desired_state(
    before: list[DesiredPort], after: list[DesiredPort]
) -> None:
    applied, wanted = by_name(*before), by_name(*after)
    result = diff(applied, wanted)
    state = dict(applied)
    for removed in result.removed:
        assert state.pop(removed.name) == removed
    for added in result.added:
        assert added.name not in state
        state[added.name] = added
    for updated in result.updated:
        assert state[updated.name].frontend == updated.frontend
        state[updated.name] = updated
    assert state == wanted
    assert result.empty == (applied == wanted)


# --- incremental planning ---------------------------------------------------



def _world(draw_services: list[tuple[int, int, bool]], with_slices: list[tuple[int, int]]
           ) -> tuple[dict[ObjectName, Service], dict[ObjectName, EndpointSlice]]:
    services = {}
    for index, port, affinity in draw_services:
        service = Service("ns", f"s{index}", ports=(ServicePortSpec("p", port),),
                          cluster_ips=(f"198.18.0.{index + 1}",),
                          session_affinity="ClientIP" if affinity else "None")
        services[service.key] = service
    slices = {}
    for index, backend in with_slices:
        endpoint_slice = EndpointSlice("ns", f"s{index}-x", f"s{index}",
                                       ports=(EndpointPort("p", 8000 + backend),),
                                       endpoints=(SliceEndpoint((f"10.0.0.{backend}",)),))
        slices[endpoint_slice.key] = endpoint_slice
    return services, slices


_SERVICES = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3), st.booleans()), max_size=6)
_SLICES = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4)), max_size=6)


@settings(max_examples=200)
@given(_SERVICES, _SLICES, _SERVICES, _SLICES)
def test_incremental_planning_equals_planning_from_scratch(
    services_before: list[tuple[int, int, bool]], slices_before: list[tuple[int, int]],
    services_after: list[tuple[int, int, bool]], slices_after: list[tuple[int, int]],
) -> None:
    old_services, old_slices = _world(services_before, slices_before)
    new_services, new_slices = _world(services_after, slices_after)
    before = desired_state(old_services, old_slices)
    touched = {key for key in old_services.keys() | new_services.keys()
               if old_services.get(key) != new_services.get(key)}
    touched |= {s.service for key in old_slices.keys() | new_slices.keys()
                for s in (old_slices.get(key), new_slices.get(key))
                if s is not None and old_slices.get(key) != new_slices.get(key)}
    after = update_state(before, new_services, slices_by_service(new_slices.values()), touched)
    from_scratch = desired_state(new_services, new_slices)
    assert after.ports == from_scratch.ports
    assert after.skipped == from_scratch.skipped
    assert after.names == from_scratch.names  # the index replanning uses
    # And the restricted diff says what the full diff says.
    assert diff(before.ports, after.ports, only=touched) == diff(before.ports, after.ports)


def test_proxy_protocol_goes_to_tcp_frontends_and_odd_values_are_warnings() -> None:
    tcp_udp = (ServicePortSpec("t", 53, "TCP"), ServicePortSpec("u", 53, "UDP"))
    services = {
        s.key: s for s in (
            service(name="dns", ports=tcp_udp, proxy_protocol="v2"),
            service(name="odd", proxy_protocol="proxy"),
            service(name="plain"),
        )
    }
    state = desired_state(services, {})
    versions = {(n.name, n.port): p.frontend.proxy_protocol for n, p in state.ports.items()}
    assert versions[("dns", "t")] == 2 and versions[("dns", "u")] == 0
    assert all(v == 0 for (name, _), v in versions.items() if name != "dns")
    assert set(state.warnings) == {ObjectName("default", "dns"), ObjectName("default", "odd")}
    assert "'proxy' is not v1 or v2" in state.warnings[ObjectName("default", "odd")]
