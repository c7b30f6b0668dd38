"""Round-robin endpoint picking with optional ClientIP affinity (pure state).

This is kube-proxy's userspace `LoadBalancerRR`, kept in one place: per
service port a shuffled endpoint list, a round-robin index and a map of
client IP -> pinned endpoint with a last-used time. Only the proxier calls
`update`/`remove`; the data path calls `pick` through a `Picker` bound to one
port. Everything runs on the event loop thread, so no locks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uproxy.model import Endpoint, ServicePortName
from uproxy.relay.base import NoEndpointsError
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


class _Pin:
    __slots__ = ("endpoint", "last_used")

    def __init__(self, endpoint: Endpoint, last_used: float) -> None:
        self.endpoint = endpoint
        self.last_used = last_used


class _PortState:
    __slots__ = ("affinity_timeout", "endpoints", "index", "pins")

    def __init__(self, endpoints: list[Endpoint], affinity_timeout: float | None) -> None:
        self.endpoints = endpoints
        self.index = 0
        self.affinity_timeout = affinity_timeout
        self.pins: dict[str, _Pin] = {}


class Balancer:
    def __init__(
        self,
        clock: Clock = time.monotonic,
        shuffle: Shuffle = random.shuffle,
    ) -> None:
        self._clock = clock
        self._shuffle = shuffle
        self._ports: dict[ServicePortName, _PortState] = {}

    def update(
        self,
        name: ServicePortName,
        endpoints: Sequence[Endpoint],
        affinity_timeout: float | None,
    ) -> None:
        """Publish a port's endpoints and affinity (a new port or a change).

        A changed endpoint set gets a fresh shuffled order and starts at its
        first entry; clients pinned to endpoints that remain keep their pin,
        so removing one endpoint re-pins only its own clients.
        """
        wanted = set(endpoints)
        state = self._ports.get(name)
        if state is None:
            self._ports[name] = _PortState(self._shuffled(wanted), affinity_timeout)
            return
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

    def pick(self, name: ServicePortName, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        """The endpoint for a new connection from `client_ip`.

        `reset_affinity` (a retry after a failed dial) ignores the client's
        pin and moves it to the next endpoint in round-robin order.
        """
        state = self._ports.get(name)
        if state is None or not state.endpoints:
            raise NoEndpointsError(f"{name} has no endpoints")
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
        """A `uproxy.relay.base.Picker` bound to one port, for its listener."""
        return PortPicker(self, name, stats)

    def has_endpoints(self, name: ServicePortName) -> bool:
        state = self._ports.get(name)
        return state is not None and bool(state.endpoints)

    def names(self) -> list[ServicePortName]:
        return sorted(self._ports)

    def snapshot(self, name: ServicePortName) -> BalancerView:
        """The port's state now; an unknown port looks like one without endpoints."""
        state = self._ports.get(name)
        if state is None:
            return BalancerView(name, (), 0, None, ())
        pins: list[tuple[str, Endpoint, float]] = []
        if state.affinity_timeout is not None:
            now = self._clock()
            for client_ip, pin in sorted(state.pins.items()):
                left = state.affinity_timeout - (now - pin.last_used)
                if left > 0:
                    pins.append((client_ip, pin.endpoint, left))
        return BalancerView(
            name=name,
            endpoints=tuple(state.endpoints),
            next_index=state.index,
            affinity_timeout=state.affinity_timeout,
            pins=tuple(pins),
        )

    def expire_pins(self) -> int:
        """Drop pins idle for longer than their port's timeout; returns how many."""
        now = self._clock()
        dropped = 0
        for state in self._ports.values():
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

    __slots__ = ("_balancer", "_labels", "_name", "_stats")

    def __init__(
        self, balancer: Balancer, name: ServicePortName, stats: PortStats | None
    ) -> None:
        self._balancer = balancer
        self._name = name
        self._stats = stats
        # "ip:port" per endpoint, so counting a pick does not format a string.
        self._labels: dict[Endpoint, str] = {}

    @property
    def name(self) -> ServicePortName:
        return self._name

    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        endpoint = self._balancer.pick(self._name, client_ip, reset_affinity)
        if self._stats is not None:
            key = self._labels.get(endpoint)
            if key is None:
                if len(self._labels) >= 4096:  # endpoints come and go; stay bounded
                    self._labels.clear()
                key = self._labels[endpoint] = str(endpoint)
            picks = self._stats.picks
            picks[key] = picks.get(key, 0) + 1
        return endpoint
