"""What the data path needs from the control plane: a way to pick endpoints."""

from __future__ import annotations

from typing import Protocol

from uproxy.model import Endpoint

# kube-proxy's userspace dial timeouts: each attempt waits longer, and every
# attempt after the first may fail over to another endpoint.
DIAL_TIMEOUTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


class NoEndpointsError(Exception):
    """The service port has no endpoints to pick from."""


class Picker(Protocol):
    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        """The endpoint for this client; raises NoEndpointsError.

        `reset_affinity` is set on retries after a failed dial: the client's
        pin is dropped and it gets the next endpoint in round-robin order.
        """
