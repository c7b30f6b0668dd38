"""Pure planning: model objects -> desired service ports -> a plan of changes.

`desired_state` decides what every service port should look like (which
endpoints, which affinity); `diff` compares that with what was applied last
and says what to open, update and close. Neither touches the network.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from uproxy.model import (
    HEADLESS_LABEL,
    PROTOCOLS,
    PROXY_PROTOCOL_ANNOTATION,
    SERVICE_PROXY_NAME_LABEL,
    DesiredPort,
    Endpoint,
    EndpointSlice,
    Frontend,
    HealthCheck,
    ObjectName,
    Service,
    ServicePortName,
    SliceEndpoint,
)

_FAMILY_OF_ADDRESS_TYPE = {"IPv4": 4, "IPv6": 6}


@dataclass(frozen=True)
class DesiredState:
    ports: Mapping[ServicePortName, DesiredPort]
    skipped: Mapping[ObjectName, str] = field(default_factory=dict)  # service -> why
    # service -> its port names in `ports`, so that replanning a service
    # finds its ports without looking at every port
    names: Mapping[ObjectName, tuple[ServicePortName, ...]] = field(default_factory=dict)
    # service -> what is wrong with a served service (said once, e.g. an unknown
    # uproxy/proxy-protocol value)
    warnings: Mapping[ObjectName, str] = field(default_factory=dict)
    # service -> its healthCheckNodePort and local endpoint count
    health_checks: Mapping[ObjectName, HealthCheck] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """The difference between what is applied and what should be.

    Apply additions as: open listener, publish endpoints, install rules;
    removals as: delete rules, close listener, forget balancer state.
    A port whose frontend changed (port number, addresses) is removed and added.
    """

    added: tuple[DesiredPort, ...] = ()
    updated: tuple[DesiredPort, ...] = ()  # same frontend; endpoints or affinity changed
    removed: tuple[DesiredPort, ...] = ()
    desired: Mapping[ServicePortName, DesiredPort] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.updated or self.removed)


def skip_reason(service: Service, proxy_name: str | None = None) -> str | None:
    """Why a service gets no proxying, or None when it does.

    Without `proxy_name` (--service-proxy-name), a service labelled
    service.kubernetes.io/service-proxy-name belongs to another proxy, as for
    kube-proxy; with it, only services labelled with that name are ours.
    """
    if service.type == "ExternalName":
        return "ExternalName service"
    label = service.labels.get(SERVICE_PROXY_NAME_LABEL)
    if proxy_name is None and label is not None:
        return f"label {SERVICE_PROXY_NAME_LABEL} hands it to another proxy"
    if proxy_name is not None and label != proxy_name:
        return f"not labelled {SERVICE_PROXY_NAME_LABEL}={proxy_name}"
    if HEADLESS_LABEL in service.labels:
        return "headless service"
    if service.cluster_ips and service.cluster_ips[0] == "None":
        return "headless service"
    return None


def usable_endpoints(endpoints: Iterable[SliceEndpoint]) -> list[SliceEndpoint]:
    """Ready endpoints; when none is ready, serving ones that are terminating.

    This is kube-proxy's fallback, so connections keep working while the last
    pods of a rollout drain.
    """
    listed = list(endpoints)
    ready = [e for e in listed if e.ready]
    if ready:
        return ready
    return [e for e in listed if e.serving and e.terminating]


def _service_families(service: Service) -> set[int]:
    families = set()
    for ip in service.cluster_ips:
        if ip and ip != "None":
            families.add(6 if ":" in ip else 4)
    return families or {4, 6}


def externally_accessible(service: Service) -> bool:
    """Whether a service takes traffic from outside: node ports, external IPs,
    load balancers (Kubernetes' `ExternallyAccessible`)."""
    return service.type in ("NodePort", "LoadBalancer") or (
        service.type == "ClusterIP" and bool(service.external_ips)
    )


def _slice_endpoints(
    service: Service, port_name: str, protocol: str, slices: Iterable[EndpointSlice],
) -> list[tuple[Endpoint, SliceEndpoint]]:
    """Every (endpoint, its conditions) of one service port over all slices."""
    families = _service_families(service)
    found: list[tuple[Endpoint, SliceEndpoint]] = []
    for endpoint_slice in slices:
        family = _FAMILY_OF_ADDRESS_TYPE.get(endpoint_slice.address_type)
        if family is None or family not in families:
            continue
        numbers = [
            p.port
            for p in endpoint_slice.ports
            if p.name == port_name and p.protocol == protocol and p.port
        ]
        if not numbers:
            continue
        for endpoint in endpoint_slice.endpoints:
            if not endpoint.addresses:
                continue
            for number in numbers:
                found.append((Endpoint(endpoint.addresses[0], number, endpoint.pod), endpoint))
    return found


def _usable(found: list[tuple[Endpoint, SliceEndpoint]]) -> tuple[Endpoint, ...]:
    usable = set(usable_endpoints(condition for _, condition in found))
    return tuple(sorted({e for e, condition in found if condition in usable}))


def _local(
    found: list[tuple[Endpoint, SliceEndpoint]], node_name: str | None,
) -> list[tuple[Endpoint, SliceEndpoint]]:
    if not node_name:
        return []
    return [pair for pair in found if pair[1].node_name == node_name]


TOPOLOGY_NODE = "node"
TOPOLOGY_ZONE = "zone"


def topology_mode(endpoints: Iterable[SliceEndpoint], zone: str, node_name: str | None) -> str:
    """Which hints a service port's cluster traffic follows here: "node", "zone" or "".

    kube-proxy's topologyModeFromHints: node hints (trafficDistribution
    PreferSameNode) when every ready endpoint has some and one names this
    node; else zone hints (PreferSameZone, PreferClose, topology-aware
    routing) when every ready endpoint has some and one names this node's
    zone; else none, and every endpoint serves. An endpoint without hints
    among hinted ones means the controller is mid-change: hints are ignored.
    """
    ready = [e for e in endpoints if e.ready]
    if not ready:
        return ""
    if node_name and all(e.node_hints for e in ready) and any(
            node_name in e.node_hints for e in ready):
        return TOPOLOGY_NODE
    if zone and all(e.zone_hints for e in ready) and any(zone in e.zone_hints for e in ready):
        return TOPOLOGY_ZONE
    return ""


def _in_topology(endpoint: SliceEndpoint, mode: str, zone: str, node_name: str | None) -> bool:
    if mode == TOPOLOGY_NODE:
        return node_name in endpoint.node_hints
    if mode == TOPOLOGY_ZONE:
        return zone in endpoint.zone_hints
    return True


def _cluster(found: list[tuple[Endpoint, SliceEndpoint]], scope: Scope) -> tuple[Endpoint, ...]:
    """Endpoints of traffic policy Cluster: the ready ones the hints leave for
    this node; when none is ready anywhere, the serving-and-terminating ones
    (the fallback ignores hints, as kube-proxy's CategorizeEndpoints does)."""
    mode = topology_mode((condition for _, condition in found), scope.zone, scope.node_name)
    if not mode:
        return _usable(found)
    return tuple(sorted({e for e, condition in found if condition.ready
                         and _in_topology(condition, mode, scope.zone, scope.node_name)}))


def port_endpoints(
    service: Service,
    port_name: str,
    protocol: str,
    slices: Iterable[EndpointSlice],
    scope: Scope,
) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...] | None]:
    """(cluster endpoints, external endpoints or None) of one service port.

    Each slice says, per port name, which number the pods listen on, so a
    named targetPort may resolve differently in different slices. As in
    kube-proxy's CategorizeEndpoints, the ready-else-terminating fallback is
    decided over all slices together: for policy Cluster after the topology
    hints, for policy Local over this node's endpoints (which ignore hints).
    Cluster-IP traffic follows internalTrafficPolicy; traffic from outside
    (node port, external IP, load-balancer IP) of an externally accessible
    service follows externalTrafficPolicy. The second value is None when
    both kinds of traffic use the same endpoints.
    """
    found = _slice_endpoints(service, port_name, protocol, slices)
    every = _cluster(found, scope)
    internal_local = service.internal_traffic_policy == "Local"
    external_local = service.external_traffic_policy == "Local"
    local = (_usable(_local(found, scope.node_name)) if internal_local or external_local
             else every)
    cluster = local if internal_local else every
    if not externally_accessible(service):
        return cluster, None
    external = local if external_local else every
    return cluster, (None if external == cluster else external)


def health_check(service: Service, slices: Iterable[EndpointSlice],
                 node_name: str | None) -> HealthCheck | None:
    """The health check node port of a LoadBalancer service with
    externalTrafficPolicy Local (the API server allocates one only then), and
    how many ready endpoints it has on this node, summed over its ports as
    kube-proxy's LocalReadyEndpoints counts them."""
    port = service.health_check_node_port
    if (port is None or service.type != "LoadBalancer"
            or service.external_traffic_policy != "Local"):
        return None
    listed = list(slices)
    count = 0
    for spec in service.ports:
        if spec.protocol not in PROTOCOLS:
            continue
        found = _local(_slice_endpoints(service, spec.name, spec.protocol, listed), node_name)
        count += len({endpoint for endpoint, condition in found if condition.ready})
    return HealthCheck(port, count)


def slices_by_service(
    slices: Iterable[EndpointSlice],
) -> dict[ObjectName, list[EndpointSlice]]:
    by_service: dict[ObjectName, list[EndpointSlice]] = {}
    for endpoint_slice in slices:
        by_service.setdefault(endpoint_slice.service, []).append(endpoint_slice)
    return by_service


PROXY_VERSIONS = {"v1": 1, "v2": 2}


def _proxy_protocol_warning(service: Service) -> str | None:
    """What is wrong with a service's uproxy/proxy-protocol, in one line, or None."""
    value = service.proxy_protocol
    if not value:
        return None
    if value not in PROXY_VERSIONS:
        return (f"{service.key}: {PROXY_PROTOCOL_ANNOTATION} {value!r} is not v1 or v2; "
                "no PROXY header is sent")
    udp = [spec.name or str(spec.port) for spec in service.ports if spec.protocol == "UDP"]
    if udp:
        return (f"{service.key}: {PROXY_PROTOCOL_ANNOTATION} {value} is for TCP; UDP port "
                f"{', '.join(udp)} gets no PROXY header")
    return None


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose view the plan is from: this node (traffic policy Local, node
    hints), its zone (zone hints) and the proxy name this uproxy answers to
    (--service-proxy-name)."""

    node_name: str | None = None
    proxy_name: str | None = None
    zone: str = ""  # this node's topology.kubernetes.io/zone, for topology hints


def service_ports(
    service: Service,
    slices: Iterable[EndpointSlice],
    scope: Scope,
    ports: dict[ServicePortName, DesiredPort],
    skipped: dict[ObjectName, str],
    warnings: dict[ObjectName, str] | None = None,
) -> None:
    """Add one service's desired ports to `ports` (or why it is skipped to
    `skipped`); what is wrong but served goes to `warnings`."""
    key = service.key
    reason = skip_reason(service, scope.proxy_name)
    if reason is not None:
        skipped[key] = reason
        return
    proxy_version = PROXY_VERSIONS.get(service.proxy_protocol, 0)
    warning = _proxy_protocol_warning(service)
    if warning is not None and warnings is not None:
        warnings[key] = warning
    service_slices = list(slices)
    affinity = float(service.affinity_timeout) if service.session_affinity == "ClientIP" else None
    cluster_ips = tuple(ip for ip in service.cluster_ips if ip and ip != "None")
    for spec in service.ports:
        if spec.protocol not in PROTOCOLS:
            skipped.setdefault(key, f"protocol {spec.protocol} is not proxied")
            continue
        name = ServicePortName(service.namespace, service.name, spec.name, spec.protocol)
        frontend = Frontend(
            name=name,
            port=spec.port,
            protocol=spec.protocol,
            cluster_ips=cluster_ips,
            node_port=spec.node_port,
            external_ips=service.external_ips,
            load_balancer_ips=service.load_balancer_ips,
            proxy_protocol=proxy_version if spec.protocol == "TCP" else 0,
        )
        endpoints, external = port_endpoints(
            service, spec.name, spec.protocol, service_slices, scope
        )
        ports[name] = DesiredPort(frontend, endpoints, affinity, external)


def desired_state(
    services: Mapping[ObjectName, Service],
    slices: Mapping[ObjectName, EndpointSlice],
    *,
    node_name: str | None = None,
    proxy_name: str | None = None,
    zone: str = "",
) -> DesiredState:
    by_service = slices_by_service(slices.values())
    ports: dict[ServicePortName, DesiredPort] = {}
    skipped: dict[ObjectName, str] = {}
    names: dict[ObjectName, tuple[ServicePortName, ...]] = {}
    warnings: dict[ObjectName, str] = {}
    checks: dict[ObjectName, HealthCheck] = {}
    scope = Scope(node_name, proxy_name, zone)
    for key, service in services.items():
        _plan_service(key, service, by_service.get(key, ()), scope,
                      _Planned(ports, skipped, names, warnings, checks))
    return DesiredState(ports, skipped, names, warnings, checks)


@dataclass(frozen=True, slots=True)
class _Planned:
    """What planning services fills in."""

    ports: dict[ServicePortName, DesiredPort]
    skipped: dict[ObjectName, str]
    names: dict[ObjectName, tuple[ServicePortName, ...]]
    warnings: dict[ObjectName, str]
    health_checks: dict[ObjectName, HealthCheck]


def _plan_service(
    key: ObjectName,
    service: Service,
    slices: Iterable[EndpointSlice],
    scope: Scope,
    into: _Planned,
) -> None:
    """One service's ports into `into.ports`, their names into `into.names`."""
    mine: dict[ServicePortName, DesiredPort] = {}
    slices = list(slices)
    service_ports(service, slices, scope, mine, into.skipped, into.warnings)
    if mine:
        into.ports.update(mine)
        into.names[key] = tuple(mine)
        check = health_check(service, slices, scope.node_name)
        if check is not None:
            into.health_checks[key] = check


def _pairs(services: Collection[ObjectName]) -> set[tuple[str, str]]:
    """(namespace, name) of each service: filtering 10k port names by these
    plain tuples is ~10x cheaper than building each one's ObjectName."""
    return {(key.namespace, key.name) for key in services}


def update_state(
    previous: DesiredState,
    services: Mapping[ObjectName, Service],
    slices: Mapping[ObjectName, Iterable[EndpointSlice]],
    touched: Collection[ObjectName],
    *,
    node_name: str | None = None,
    proxy_name: str | None = None,
    zone: str = "",
) -> DesiredState:
    """`previous` with the services in `touched` planned again.

    Equal to `desired_state` over the same objects when `previous` was, and
    costs what the touched services cost: a one-service change in a cluster
    of 10k services plans one service. `slices` maps a service to its slices.
    """
    ports = dict(previous.ports)  # a dict copy keeps the hashes: no Python per port
    names = dict(previous.names)
    for key in touched:
        for name in names.pop(key, ()):
            del ports[name]
    skipped = {key: why for key, why in previous.skipped.items() if key not in touched}
    warnings = {key: why for key, why in previous.warnings.items() if key not in touched}
    checks = {key: check for key, check in previous.health_checks.items() if key not in touched}
    scope = Scope(node_name, proxy_name, zone)
    into = _Planned(ports, skipped, names, warnings, checks)
    for key in touched:
        service = services.get(key)
        if service is not None:
            _plan_service(key, service, slices.get(key, ()), scope, into)
    return DesiredState(ports, skipped, names, warnings, checks)


def diff(
    applied: Mapping[ServicePortName, DesiredPort],
    desired: Mapping[ServicePortName, DesiredPort],
    only: Collection[ObjectName] | None = None,
) -> Plan:
    """What changes `applied` into `desired`; with `only`, just for those services
    (the caller knows nothing else changed)."""
    if only is not None:
        keep = _pairs(only)
        applied = {n: p for n, p in applied.items() if (n.namespace, n.name) in keep}
        wanted = {n: p for n, p in desired.items() if (n.namespace, n.name) in keep}
    else:
        wanted = dict(desired)
    added: list[DesiredPort] = []
    updated: list[DesiredPort] = []
    removed: list[DesiredPort] = []
    for name, old in applied.items():
        new = wanted.get(name)
        if new is None or new.frontend != old.frontend:
            removed.append(old)
    for name, port in wanted.items():
        was = applied.get(name)
        if was is None or port.frontend != was.frontend:
            added.append(port)
        elif port != was:
            updated.append(port)
    return Plan(
        added=tuple(sorted(added, key=lambda p: p.name)),
        updated=tuple(sorted(updated, key=lambda p: p.name)),
        removed=tuple(sorted(removed, key=lambda p: p.name)),
        desired=dict(desired),
    )
