"""The seam between the control plane and the data path: picking an endpoint.

A listener's server holds a `Picker` for its service port (the balancer's
`PortPicker`, or a worker's); it declares everything a relay calls. Pure:
the balancer and the relays both import it, and neither imports the other.
"""

from __future__ import annotations

from typing import Protocol

from uproxy.model import Endpoint

# kube-proxy's userspace dial timeouts: each attempt waits longer, and every
# attempt after the first fails over to the next endpoint the picker gives.
DIAL_TIMEOUTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


class NoEndpointsError(Exception):
    """The service port has no endpoints to pick from."""


class TrafficSplit:
    """What a listener needs to tell one port's cluster traffic from its
    external traffic (`externalTrafficPolicy: Local` and the like). Every
    picker of a port shares one, which the balancer updates in place for as
    long as a picker holds it; a picker that never splits keeps an inactive one."""

    __slots__ = ("__weakref__", "active", "cluster_ips")

    def __init__(self) -> None:
        self.active = False  # external traffic has endpoints of its own
        # The cluster IPs as the kernel reports an original destination:
        # 4 (IPv4) or 16 (IPv6) bytes in network order.
        self.cluster_ips: frozenset[bytes] = frozenset()

    def is_external(self, destination: bytes) -> bool:
        """Whether a connection to `destination` (packed) came from outside:
        to a node port, an external IP or a load-balancer IP."""
        return destination not in self.cluster_ips


class Picker(Protocol):
    """Picks endpoints for one service port's connections and sessions."""

    @property
    def split(self) -> TrafficSplit:
        """Whether, and how, external traffic is picked on its own."""

    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        """The endpoint for this client; raises NoEndpointsError.

        `reset_affinity` is set on retries after a failed dial: the client's
        pin is dropped and it gets the next endpoint in round-robin order.
        """

    def pick_external(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        """`pick` for traffic from outside (node port, external or LB IP)."""
