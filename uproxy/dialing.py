"""Which endpoints are dialled directly and which through the API server's
port-forward (`--dial`).

- `direct`: every endpoint directly; no routes are consulted at all.
- `portforward`: every endpoint that has a pod (an EndpointSlice targetRef of
  kind Pod) through port-forward; one without is dialled directly, as there
  is nothing to forward to.
- `auto`: per pod network, decided once. A network is the endpoint's IPv4
  /16 or IPv6 /64 (a cluster's pod range, split into per-node ranges, is
  rarely smaller). When a sync first publishes endpoints of a network,
  uproxy connects to one of them, off the connection path, with a
  `PROBE_TIMEOUT` limit: connected, or refused by the host, means the
  network answers from here and its endpoints are dialled directly; no
  answer, or no route, means port-forward. Until the probe has answered,
  that network's endpoints go through port-forward, which works either way.
  Each decision is logged once.

A connection asks `via_portforward(endpoint)`: a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

from uproxy.model import Endpoint

log = logging.getLogger("uproxy.dial")

MODES = ("direct", "portforward", "auto")
NETWORK_BITS = {4: 16, 6: 64}
PROBE_TIMEOUT = 1.0
_NETWORK_CACHE = 65536  # addresses whose network is remembered

# (endpoint) -> (answers directly, how it went in a few words)
Probe = Callable[[Endpoint], Awaitable[tuple[bool, str]]]


def network_of(ip: str) -> str:
    """The pod network an address is decided for: its /16 (IPv4) or /64 (IPv6)."""
    address = ipaddress.ip_address(ip)
    return str(ipaddress.ip_network(f"{ip}/{NETWORK_BITS[address.version]}", strict=False))


async def tcp_probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Whether `endpoint` answers a TCP connect from here (a refusal is an answer)."""
    family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
    started = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                sock, (endpoint.ip, endpoint.port)), timeout)
        except TimeoutError:
            return False, f"no answer within {timeout:g}s"
        except ConnectionRefusedError:
            return True, "refused: the host answered"
        except OSError as error:
            return False, (error.strerror or str(error)).lower()
    return True, f"connected in {(time.monotonic() - started) * 1000:.0f} ms"


class DialRoutes:
    """The routes of `--dial portforward` and `--dial auto` (see the module's text)."""

    def __init__(self, mode: str, *, probe: Probe = tcp_probe) -> None:
        if mode not in ("portforward", "auto"):
            raise ValueError(f"--dial {mode}: routes are for portforward and auto")
        self.mode = mode
        self._probe = probe
        self._direct: dict[str, bool] = {}  # network -> answers directly
        self._pending: set[str] = set()  # networks whose probe has not answered
        self._networks: dict[str, str] = {}  # address -> network
        self._tasks: set[asyncio.Task[None]] = set()

    def _network(self, ip: str) -> str:
        network = self._networks.get(ip)
        if network is None:
            if len(self._networks) >= _NETWORK_CACHE:
                self._networks.clear()
            network = self._networks[ip] = network_of(ip)
        return network

    def via_portforward(self, endpoint: Endpoint) -> bool:
        if not endpoint.pod:
            return False
        if self.mode == "portforward":
            return True
        return self._direct.get(self._network(endpoint.ip)) is not True

    def route_of(self, endpoint: Endpoint) -> str:
        """For /status: `direct`, `portforward`, or `portforward (deciding)`."""
        if not self.via_portforward(endpoint):
            return "direct"
        if self.mode == "auto" and not self.decided(self._network(endpoint.ip)):
            return "portforward (deciding)"
        return "portforward"

    def observe(self, endpoints: Iterable[Endpoint]) -> None:
        """Endpoints a sync published: probe every network not yet decided or probing."""
        if self.mode != "auto":
            return
        loop = asyncio.get_running_loop()
        for endpoint in endpoints:
            if not endpoint.pod:
                continue
            network = self._network(endpoint.ip)
            if network in self._direct or network in self._pending:
                continue
            self._pending.add(network)  # port-forward until the probe answers
            task = loop.create_task(self._decide(network, endpoint), name=f"probe {network}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def decided(self, network: str) -> bool:
        """Whether `network`'s probe has answered."""
        return network in self._direct

    async def _decide(self, network: str, endpoint: Endpoint) -> None:
        try:
            answers, how = await self._probe(endpoint)
        finally:
            self._pending.discard(network)
        self._direct[network] = answers
        if answers:
            log.info("dial auto: pods in %s answer from here (%s: %s): dialling them directly",
                     network, endpoint, how)
        else:
            log.info("dial auto: pods in %s do not answer from here (%s: %s): reaching them "
                     "through the API server's port-forward", network, endpoint, how)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
