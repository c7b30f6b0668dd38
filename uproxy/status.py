"""What `/status.json` (and the `/status` page) shows: a plain dict built from
the proxier's read-only state.

`build_status` is pure: it reads the objects it is given and the time it is
told, so tests build it from small fakes and the page renders exactly this.
For each service port it explains "how a packet gets here": the nat chain and
rule that steer a connection to the listener, the listener, and the balancer's
next decision, in the words and chain names of docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any, Protocol

from uproxy.model import (
    DesiredPort,
    Endpoint,
    Frontend,
    HealthCheck,
    Node,
    ObjectName,
    ServicePortName,
    format_hostport,
)
from uproxy.picking import DIAL_TIMEOUTS
from uproxy.rules.base import Portal
from uproxy.rules.render import portal_entries, portal_hop
from uproxy.stats import PortStats

WILDCARDS = ("0.0.0.0", "::", "")
MAX_PINS_SHOWN = 50  # per port; a busy ClientIP service may pin thousands


class BalancerViewLike(Protocol):
    """One port's balancer state (uproxy.balancer.BalancerView)."""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]: ...  # in round-robin order

    @property
    def next_index(self) -> int: ...

    @property
    def affinity_timeout(self) -> float | None: ...

    @property
    def pins(self) -> tuple[tuple[str, Endpoint, float], ...]: ...  # (client, endpoint, left)


class BalancerSnapshots(Protocol):
    def snapshot(self, name: ServicePortName) -> BalancerViewLike: ...


class RouteView(Protocol):
    """How endpoints are dialled (uproxy.dialing.DialRoutes, with --dial)."""

    def route_of(self, endpoint: Endpoint) -> str: ...


class StatusInputs(Protocol):
    """The proxier's read-only state, as the status page and metrics read it."""

    @property
    def routes(self) -> RouteView | None: ...

    @property
    def portforward_streams(self) -> int: ...

    @property
    def applied(self) -> Mapping[ServicePortName, DesiredPort]: ...

    @property
    def bound(self) -> Mapping[ServicePortName, tuple[str, int]]: ...

    @property
    def errors(self) -> Mapping[ServicePortName, str]: ...

    @property
    def stats(self) -> Mapping[ServicePortName, PortStats]: ...

    @property
    def balancer(self) -> BalancerSnapshots: ...

    @property
    def rules_name(self) -> str: ...

    @property
    def chain_prefix(self) -> str: ...

    @property
    def laptop_mode(self) -> bool: ...

    @property
    def skipped(self) -> Mapping[ObjectName, str]: ...

    @property
    def node_name(self) -> str | None: ...

    @property
    def node(self) -> Node | None: ...

    @property
    def health_checks(self) -> Mapping[ObjectName, HealthCheck]: ...


class RunnerView(Protocol):
    @property
    def last_success(self) -> float | None: ...  # time.monotonic() of the last good sync

    @property
    def syncs(self) -> int: ...


class TrackerView(Protocol):
    """uproxy.tracking.ChangeTracker, as readiness reads it."""

    @property
    def synced_sources(self) -> Set[str]: ...  # sources that delivered a first full view


def sources_ready(tracker: TrackerView, required: Set[str]) -> tuple[bool, list[str]]:
    """Whether every required source has synced, and which have not."""
    missing = sorted(set(required) - set(tracker.synced_sources))
    return not missing, missing


def build_status(
    proxier: StatusInputs,
    runner: RunnerView | None = None,
    tracker: TrackerView | None = None,
    required_sources: Set[str] = frozenset(),
    *,
    now: float,
) -> dict[str, Any]:
    """The JSON-able status document; `now` is time.monotonic() (sync age)."""
    names = sorted(set(proxier.applied) | set(proxier.errors))
    by_service: dict[ObjectName, list[dict[str, Any]]] = {}
    for name in names:
        by_service.setdefault(name.service, []).append(_port_status(proxier, name))

    services = [
        {"service": str(service), "namespace": service.namespace, "name": service.name,
         "ports": ports}
        for service, ports in sorted(by_service.items())
    ]
    totals = {
        "services": len(by_service),
        "service_ports": len(names),
        "listeners": len(proxier.bound),
        "endpoints": sum(len(p.endpoints) for p in proxier.applied.values()),
        "connections_active": sum(s.connections_active for s in proxier.stats.values()),
        "udp_sessions_active": sum(s.udp_sessions_active for s in proxier.stats.values()),
    }
    return {
        "mode": "laptop" if proxier.laptop_mode else "rules",
        "rules": proxier.rules_name,
        "chain_prefix": proxier.chain_prefix,
        "sync": _sync_status(runner, tracker, required_sources, now),
        "totals": totals,
        "services": services,
        "skipped": [
            {"service": str(key), "reason": reason}
            for key, reason in sorted(proxier.skipped.items())
        ],
        "node": _node_status(proxier),
        "health_checks": [
            {"service": str(key), "node_port": check.node_port,
             "local_endpoints": check.local_endpoints}
            for key, check in sorted(proxier.health_checks.items())
        ],
    }


def _node_status(proxier: StatusInputs) -> dict[str, Any]:
    """This node as uproxy sees it: its name, and its Node's zone and state once known."""
    node = proxier.node
    return {"name": proxier.node_name, "known": node is not None,
            "zone": node.zone if node is not None else "",
            "terminating": node is not None and node.terminating}


def _sync_status(
    runner: RunnerView | None,
    tracker: TrackerView | None,
    required: Set[str],
    now: float,
) -> dict[str, Any]:
    last = runner.last_success if runner is not None else None
    ready_sources, missing = (
        sources_ready(tracker, required) if tracker is not None else (True, [])
    )
    return {
        "syncs": runner.syncs if runner is not None else 0,
        "last_success_age_seconds": None if last is None else round(max(0.0, now - last), 3),
        "sources_synced": sorted(tracker.synced_sources) if tracker is not None else [],
        "sources_missing": missing,
        "ready": ready_sources and last is not None,
    }


def _port_status(proxier: StatusInputs, name: ServicePortName) -> dict[str, Any]:
    desired = proxier.applied.get(name)
    stats = proxier.stats.get(name) or PortStats()
    bound = proxier.bound.get(name)
    error = proxier.errors.get(name)
    view = proxier.balancer.snapshot(name)
    frontend = desired.frontend if desired is not None else None
    protocol = frontend.protocol if frontend is not None else name.protocol
    number = frontend.port if frontend is not None else None
    listener = format_hostport(*bound) if bound is not None else None

    if proxier.laptop_mode:
        # The listener owns a loopback IP and the service's real port.
        address = listener
    elif frontend is not None and frontend.addresses:
        address = format_hostport(frontend.addresses[0], frontend.port)
    else:
        address = None

    pinned: dict[Endpoint, int] = {}
    for _client, endpoint, _left in view.pins:
        pinned[endpoint] = pinned.get(endpoint, 0) + 1
    order = list(view.endpoints)
    # Endpoints the balancer has not been told about yet are still shown.
    for endpoint in desired.endpoints if desired is not None else ():
        if endpoint not in order:
            order.append(endpoint)
    next_endpoint = (
        view.endpoints[view.next_index % len(view.endpoints)] if view.endpoints else None
    )
    endpoints = [
        {
            "address": str(endpoint),
            "pod": endpoint.pod or None,
            # direct, or through the API server's port-forward (--dial)
            "dial": "direct" if proxier.routes is None else proxier.routes.route_of(endpoint),
            "picks": stats.picks.get(str(endpoint), 0),
            "next": endpoint == next_endpoint,
            "pinned_clients": pinned.get(endpoint, 0),
        }
        for endpoint in order
    ]

    entry: dict[str, Any] = {
        "id": str(name),
        "service": str(name.service),
        "port_name": name.port,
        "port": number,
        "protocol": protocol,
        "address": address,
        "addresses": list(frontend.addresses) if frontend is not None else [],
        "node_port": frontend.node_port if frontend is not None else None,
        "listener": listener,
        "error": error,
        "rules": proxier.rules_name,
        "endpoints": endpoints,
        "next_endpoint": str(next_endpoint) if next_endpoint is not None else None,
        # Endpoints of traffic from outside (node port, external IPs, load-balancer
        # IPs) when a traffic policy makes them differ; None: the same as `endpoints`.
        "external_endpoints": None if desired is None or desired.external_endpoints is None
        else [str(endpoint) for endpoint in desired.external_endpoints],
        "affinity": None if view.affinity_timeout is None else {
            "timeout_seconds": view.affinity_timeout,
            "pinned_total": len(view.pins),
            "pins": [
                {"client": client, "endpoint": str(endpoint), "seconds_left": round(left, 1)}
                for client, endpoint, left in view.pins[:MAX_PINS_SHOWN]
            ],
        },
        "connections": {
            "accepted": stats.connections_accepted,
            "active": stats.connections_active,
            "failed": stats.connections_failed,
            "no_endpoints": stats.no_endpoints,
        },
        "bytes": {"in": stats.bytes_in, "out": stats.bytes_out},
        "path": packet_path(proxier, name, desired, bound, error, view),
    }
    if protocol == "UDP":
        entry["udp"] = {
            "sessions_active": stats.udp_sessions_active,
            "sessions_created": stats.udp_sessions_created,
            "sessions_expired": stats.udp_sessions_expired,
            "datagrams_in": stats.udp_datagrams_in,
            "datagrams_out": stats.udp_datagrams_out,
            "datagrams_dropped": stats.udp_datagrams_dropped,
        }
    return entry


def packet_path(
    proxier: StatusInputs,
    name: ServicePortName,
    desired: DesiredPort | None,
    bound: tuple[str, int] | None,
    error: str | None,
    view: BalancerViewLike,
) -> list[str]:
    """Human-readable steps a new connection takes to reach an endpoint."""
    if desired is None:
        return [f"not served: {error}" if error else "not served"]
    frontend = desired.frontend
    protocol = frontend.protocol
    steps: list[str] = []
    if bound is None:
        steps.append(f"not served: {error or 'no listener is bound yet'}")
        return steps

    proxy_ip, proxy_port = bound
    listener = format_hostport(proxy_ip, proxy_port)
    if proxier.laptop_mode:
        steps.append(
            f"client connects straight to {listener}/{protocol}: laptop mode gives the "
            "service its own IP with its real port, no kernel rules"
        )
    elif proxier.rules_name in ("none", ""):
        steps.append(
            f"no kernel rules (--rules none): clients must connect to {listener} themselves"
        )
    else:
        if frontend.addresses:
            steps.append(
                f"client connects to {format_hostport(frontend.addresses[0], frontend.port)}"
                f"/{protocol}: a virtual IP, nothing listens there"
            )
        steps.extend(_rule_steps(proxier, frontend, proxy_ip, proxy_port))
    kind = "accepts the connection" if protocol == "TCP" else "receives the datagram"
    steps.append(f"listener {listener} ({protocol}) {kind}")
    steps.append(_balancer_step(view, protocol))
    if desired.external_endpoints is not None:
        steps.append(_external_step(desired.external_endpoints, protocol))
    if view.endpoints:
        if protocol == "TCP":
            tries = " → ".join(f"{t * 1000:g} ms" if t < 1 else f"{t:g} s"
                               for t in DIAL_TIMEOUTS)
            steps.append(f"dial the endpoint at once ({len(DIAL_TIMEOUTS)} attempts of {tries}, "
                         "failing over to the next endpoint), then relay bytes both ways")
        else:
            steps.append("forward through the client's UDP session; replies go back "
                         "from the service address")
    return steps


def _rule_steps(proxier: StatusInputs, frontend: Frontend, proxy_ip: str,
                proxy_port: int) -> list[str]:
    """The backend's own rule text for each way in (the same words as `uproxy explain`)."""
    steps: list[str] = []
    backend, prefix = proxier.rules_name, proxier.chain_prefix
    for entry in portal_entries([Portal(frontend, proxy_ip, proxy_port)]):
        where = (f"node port {entry.port}" if entry.kind == "nodeport"
                 else format_hostport(entry.address or "", entry.port))
        steps.append(f"to {where} from this host: {portal_hop(backend, prefix, entry, 'host')}")
        steps.append(f"to {where} from pods/other hosts: "
                     f"{portal_hop(backend, prefix, entry, 'container')}")
    if not steps:
        steps.append("no virtual IP: only the listener itself reaches this port")
    return steps


def _external_step(endpoints: tuple[Endpoint, ...], protocol: str) -> str:
    outside = "from outside (node port, external IPs, load-balancer IPs)"
    if protocol != "TCP":
        return (f"{outside}: UDP does not tell it apart; the endpoints above serve it "
                "(the traffic policy applies to TCP only)")
    told = "told apart by the connection's original destination (SO_ORIGINAL_DST)"
    if not endpoints:
        return f"{outside}, {told}: no endpoints by the traffic policy → connection reset"
    listed = ", ".join(str(endpoint) for endpoint in endpoints)
    return f"{outside}, {told}: round-robin over its own endpoints by the traffic policy: {listed}"


def _balancer_step(view: BalancerViewLike, protocol: str) -> str:
    count = len(view.endpoints)
    if not count:
        fate = "connection reset" if protocol == "TCP" else "datagram dropped"
        return f"balancer: no endpoints → {fate} (counted as no_endpoints)"
    nxt = view.endpoints[view.next_index % count]
    plural = "endpoint" if count == 1 else "endpoints"
    rr = f"round-robin over {count} {plural}, next: {nxt}"
    if view.affinity_timeout is None:
        return f"balancer: {rr}"
    timeout = view.affinity_timeout
    shown = f"{timeout:g}"
    return (f"balancer: ClientIP affinity, {shown} s ({len(view.pins)} pinned clients); "
            f"new clients: {rr}")
