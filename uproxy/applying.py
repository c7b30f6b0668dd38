"""What the proxier applies a plan to: three sides, each a small Protocol
(and, on a node, the health check node ports' server).

The proxier, the single writer, drives them in one written order (see
`uproxy.proxier`): additions open the listener, publish its endpoints, then
install the rules that steer traffic to it; removals delete the rules, close
the listener, then forget the endpoints. The listener pool
(`uproxy.listeners.ListenerPool`), the balancer (`uproxy.balancer.Balancer`)
and a rule backend (`uproxy.rules.base.Rules`) are the real sides;
`uproxy.fakes` has a fake of each listener and endpoint side that writes one
shared timeline with `uproxy.rules.fake.FakeRules`, so a test can pin the order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, Protocol, TypeVar

from uproxy.balancer import BalancerView
from uproxy.model import DesiredPort, HealthCheck, ObjectName, ServicePortName
from uproxy.stats import PortStats

Handle = TypeVar("Handle")  # a detached listener, as its pool knows it


class Listeners(Protocol, Generic[Handle]):
    """One listener per service port (the pool), as the proxier uses it."""

    @property
    def laptop_mode(self) -> bool:
        """Listeners bind service IPs from --bind-range (no kernel rules)."""

    @property
    def bound(self) -> Mapping[ServicePortName, tuple[str, int]]:
        """Where each open listener listens: (IP, port)."""

    @property
    def unserved(self) -> Mapping[ServicePortName, str]:
        """Ports without a listener, and why (one line each)."""

    @property
    def stats(self) -> Mapping[ServicePortName, PortStats]:
        """Each port's counters."""

    def open(self, port: DesiredPort) -> bool:
        """Open and start a port's listener; False (and a reason in `unserved`)
        when it cannot be bound."""

    def detach(self, name: ServicePortName) -> Handle | None:
        """Take a port's listener out of service without closing it (a new
        listener for the same port may open first)."""

    def retire(self, detached: Handle) -> None:
        """Close a detached listener: new connections are refused, open ones go on."""

    def forget(self, name: ServicePortName) -> None:
        """The port is gone for good: its counters and any reason it was not served."""


class Endpoints(Protocol):
    """The balancer's publishing side, as the proxier uses it."""

    def publish(self, port: DesiredPort) -> None:
        """A port's endpoints, affinity and traffic split (new or changed)."""

    def remove(self, name: ServicePortName) -> None:
        """Forget everything about a port."""

    def expire_pins(self) -> int:
        """Drop affinity pins past their timeout; how many."""

    def snapshot(self, name: ServicePortName) -> BalancerView:
        """A port's state now, for the status page."""


class HealthChecks(Protocol):
    """The health check node ports' server (rules mode), as the proxier uses it:
    a listener per check, which the rules reach like any node port."""

    @property
    def bound(self) -> Mapping[ObjectName, tuple[str, int]]:
        """Where each check's listener listens: (IP, port)."""

    async def update(self, checks: Mapping[ObjectName, HealthCheck]) -> None:
        """Open the listeners of new checks and answer with these counts from now
        on; the listeners of gone checks stay open until `retire`."""

    async def retire(self) -> None:
        """Close the listeners of checks that are gone (after their rules are)."""
