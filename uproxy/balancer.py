"""Round-robin endpoint picking with optional ClientIP affinity (pure state).

This is kube-proxy's userspace `LoadBalancerRR`, kept in one place: per
service port a shuffled endpoint list, a round-robin index and a map of
client IP -> pinned endpoint with a last-used time. Only the proxier calls
`update`/`publish`/`remove`; the data path calls `pick` through a `Picker`
bound to one port. Everything runs on the event loop thread, so no locks.

A port whose external traffic (node port, external IP, load-balancer IP) has
its own endpoints (`externalTrafficPolicy: Local`; `DesiredPort.
external_endpoints`) keeps a second, independent state of the same kind for
that traffic: its own order, index and affinity pins. Its listener learns
this from the picker's `split` (a `TrafficSplit`, one object per port that
the balancer keeps current), asks the kernel for a connection's original
destination only then, and picks with `pick_external` when that destination
is not one of the port's cluster IPs.
"""

from __future__ import annotations

import ipaddress
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uproxy.model import DesiredPort, Endpoint, ServicePortName
from uproxy.picking import NoEndpointsError, TrafficSplit
from uproxy.stats import PortStats

Clock = Callable[[], float]
Shuffle = Callable[[list[Endpoint]], None]


@dataclass(frozen=True, slots=True)
class BalancerView:
    """One port's balancer state, for the status page."""

    name: ServicePortName
    endpoints: tuple[Endpoint, ...]  # in round-robin order
    next_index: int
    affinity_timeout: float | None
    pins: tuple[tuple[str, Endpoint, float], ...]  # (client IP, endpoint, seconds left)
    # External traffic's own endpoints (round-robin order) when they differ.
    external_endpoints: tuple[Endpoint, ...] | None = None
    external_pins: tuple[tuple[str, Endpoint, float], ...] = ()
    cluster_ips: tuple[str, ...] = ()


class _Pin:
    __slots__ = ("endpoint", "last_used")

    def __init__(self, endpoint: Endpoint, last_used: float) -> None:
        self.endpoint = endpoint
        self.last_used = last_used


class _PortState:
    __slots__ = ("affinity_timeout", "cluster_ips", "endpoints", "external", "index", "pins")

    def __init__(self, endpoints: list[Endpoint], affinity_timeout: float | None) -> None:
        self.endpoints = endpoints
        self.index = 0
        self.affinity_timeout = affinity_timeout
        self.pins: dict[str, _Pin] = {}
        self.external: _PortState | None = None  # external traffic's own state
        self.cluster_ips: tuple[str, ...] = ()


class Balancer:
    def __init__(
        self,
        clock: Clock = time.monotonic,
        shuffle: Shuffle = random.shuffle,
    ) -> None:
        self._clock = clock
        self._shuffle = shuffle
        self._ports: dict[ServicePortName, _PortState] = {}
        # Weak: a port's split lives as long as a picker (a listener) holds it.
        self._splits: weakref.WeakValueDictionary[ServicePortName, TrafficSplit] = (
            weakref.WeakValueDictionary())

    def update(
        self,
        name: ServicePortName,
        endpoints: Sequence[Endpoint],
        affinity_timeout: float | None,
        *,
        external_endpoints: Sequence[Endpoint] | None = None,
        cluster_ips: Sequence[str] = (),
    ) -> None:
        """Publish a port's endpoints and affinity (a new port or a change).

        A changed endpoint set gets a fresh shuffled order and starts at its
        first entry; clients pinned to endpoints that remain keep their pin,
        so removing one endpoint re-pins only its own clients.
        `external_endpoints` (with the port's `cluster_ips`, which tell the
        two kinds of traffic apart) serve traffic from outside when they
        differ from `endpoints`; the same rules apply to them on their own.
        """
        state = self._ports.get(name)
        if state is None:
            state = self._ports[name] = _PortState(
                self._shuffled(set(endpoints)), affinity_timeout)
        else:
            self._refresh(state, endpoints, affinity_timeout)
        if external_endpoints is None:
            state.external = None
        elif state.external is None:
            state.external = _PortState(self._shuffled(set(external_endpoints)), affinity_timeout)
        else:
            self._refresh(state.external, external_endpoints, affinity_timeout)
        state.cluster_ips = tuple(cluster_ips)
        split = self._splits.get(name)
        if split is not None:
            _set_split(split, state)

    def publish(self, port: DesiredPort) -> None:
        """`update` with everything a planned port says."""
        self.update(port.name, port.endpoints, port.affinity_timeout,
                    external_endpoints=port.external_endpoints,
                    cluster_ips=port.frontend.cluster_ips)

    def _refresh(self, state: _PortState, endpoints: Sequence[Endpoint],
                 affinity_timeout: float | None) -> None:
        wanted = set(endpoints)
        if wanted != set(state.endpoints):
            state.endpoints = self._shuffled(wanted)
            state.index = 0
            state.pins = {ip: pin for ip, pin in state.pins.items() if pin.endpoint in wanted}
        if affinity_timeout != state.affinity_timeout:
            state.affinity_timeout = affinity_timeout
            if affinity_timeout is None:
                state.pins.clear()

    def remove(self, name: ServicePortName) -> None:
        """Forget everything about a port; other ports keep their position."""
        self._ports.pop(name, None)
        split = self._splits.get(name)
        if split is not None:
            split.active = False

    def pick(self, name: ServicePortName, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        """The endpoint for a new connection from `client_ip`.

        `reset_affinity` (a retry after a failed dial) ignores the client's
        pin and moves it to the next endpoint in round-robin order.
        """
        state = self._ports.get(name)
        if state is None or not state.endpoints:
            raise NoEndpointsError(f"{name} has no endpoints")
        # `_choose`'s round-robin step inlined: every connection comes here.
        if state.affinity_timeout is None:
            endpoint = state.endpoints[state.index]
            state.index = (state.index + 1) % len(state.endpoints)
            return endpoint
        return self._choose(state, client_ip, reset_affinity)

    def pick_external(self, name: ServicePortName, client_ip: str,
                      reset_affinity: bool = False) -> Endpoint:
        """`pick` for a connection from outside (node port, external IP,
        load-balancer IP): from the port's external endpoints when it has its
        own, which may be none (the connection is refused)."""
        state = self._ports.get(name)
        if state is not None and state.external is not None:
            state = state.external
        if state is None or not state.endpoints:
            raise NoEndpointsError(f"{name} has no endpoints for external traffic")
        return self._choose(state, client_ip, reset_affinity)

    def _choose(self, state: _PortState, client_ip: str, reset_affinity: bool) -> Endpoint:
        timeout = state.affinity_timeout
        if timeout is None:
            endpoint = state.endpoints[state.index]
            state.index = (state.index + 1) % len(state.endpoints)
            return endpoint
        now = self._clock()
        pin = state.pins.get(client_ip)
        if pin is not None and not reset_affinity and now - pin.last_used < timeout:
            pin.last_used = now
            return pin.endpoint
        endpoint = state.endpoints[state.index]
        state.index = (state.index + 1) % len(state.endpoints)
        if pin is None:
            state.pins[client_ip] = _Pin(endpoint, now)
        else:
            pin.endpoint = endpoint
            pin.last_used = now
        return endpoint

    def picker(self, name: ServicePortName, stats: PortStats | None = None) -> PortPicker:
        """A `uproxy.picking.Picker` bound to one port, for its listener."""
        split = self._splits.get(name)
        if split is None:
            split = self._splits[name] = TrafficSplit()
            state = self._ports.get(name)
            if state is not None:
                _set_split(split, state)
        return PortPicker(self, name, stats, split)

    def names(self) -> list[ServicePortName]:
        return sorted(self._ports)

    def snapshot(self, name: ServicePortName) -> BalancerView:
        """The port's state now; an unknown port looks like one without endpoints."""
        state = self._ports.get(name)
        if state is None:
            return BalancerView(name, (), 0, None, ())
        external = state.external
        return BalancerView(
            name=name,
            endpoints=tuple(state.endpoints),
            next_index=state.index,
            affinity_timeout=state.affinity_timeout,
            pins=self._live_pins(state),
            external_endpoints=None if external is None else tuple(external.endpoints),
            external_pins=() if external is None else self._live_pins(external),
            cluster_ips=state.cluster_ips,
        )

    def _live_pins(self, state: _PortState) -> tuple[tuple[str, Endpoint, float], ...]:
        pins: list[tuple[str, Endpoint, float]] = []
        if state.affinity_timeout is not None:
            now = self._clock()
            for client_ip, pin in sorted(state.pins.items()):
                left = state.affinity_timeout - (now - pin.last_used)
                if left > 0:
                    pins.append((client_ip, pin.endpoint, left))
        return tuple(pins)

    def expire_pins(self) -> int:
        """Drop pins idle for longer than their port's timeout; returns how many."""
        now = self._clock()
        dropped = 0
        states = list(self._ports.values())
        states += [state.external for state in states if state.external is not None]
        for state in states:
            timeout = state.affinity_timeout
            if timeout is None or not state.pins:
                continue
            stale = [ip for ip, pin in state.pins.items() if now - pin.last_used >= timeout]
            for client_ip in stale:
                del state.pins[client_ip]
            dropped += len(stale)
        return dropped

    def _shuffled(self, endpoints: set[Endpoint]) -> list[Endpoint]:
        # Sorted first, so an injected no-op shuffle gives a known order.
        ordered = sorted(endpoints)
        self._shuffle(ordered)
        return ordered


class PortPicker:
    """Picks for one service port; what a listener holds."""

    __slots__ = ("_balancer", "_labels", "_name", "_stats", "split")

    def __init__(
        self, balancer: Balancer, name: ServicePortName, stats: PortStats | None,
        split: TrafficSplit | None = None,
    ) -> None:
        self._balancer = balancer
        self._name = name
        self._stats = stats
        # Kept current by the balancer: whether (and how) this port's external
        # traffic is picked on its own.
        self.split = TrafficSplit() if split is None else split
        # "ip:port" per endpoint, so counting a pick does not format a string.
        self._labels: dict[Endpoint, str] = {}

    @property
    def name(self) -> ServicePortName:
        return self._name

    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        return self._count(self._balancer.pick(self._name, client_ip, reset_affinity))

    def pick_external(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        """For a connection from outside; see `Balancer.pick_external`."""
        return self._count(self._balancer.pick_external(self._name, client_ip, reset_affinity))

    def _count(self, endpoint: Endpoint) -> Endpoint:
        """Count a pick (as `pick` does)."""
        if self._stats is not None:
            key = self._labels.get(endpoint)
            if key is None:
                if len(self._labels) >= 4096:  # endpoints come and go; stay bounded
                    self._labels.clear()
                key = self._labels[endpoint] = str(endpoint)
            picks = self._stats.picks
            picks[key] = picks.get(key, 0) + 1
        return endpoint


def _set_split(split: TrafficSplit, state: _PortState) -> None:
    split.active = state.external is not None
    split.cluster_ips = _packed(state.cluster_ips) if split.active else frozenset()


def _packed(addresses: Sequence[str]) -> frozenset[bytes]:
    packed = set()
    for address in addresses:
        try:
            packed.add(ipaddress.ip_address(address).packed)
        except ValueError:
            continue
    return frozenset(packed)
