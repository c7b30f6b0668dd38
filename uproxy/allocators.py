"""Allocators for proxy ports (rules mode) and per-service IPs (laptop mode).

Pure bookkeeping: they hand out numbers and addresses; the listener pool
binds them and reports back what it could not bind.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random

from uproxy.durations import PortRange
from uproxy.model import ObjectName


class ExhaustedError(Exception):
    """No free port or address is left."""


class PortAllocator:
    """Hands out ports of a range, starting at a random spot and scanning on,
    like kube-proxy's userspace rangeAllocator, so restarts rarely reuse the
    port a previous run had just given up."""

    def __init__(self, port_range: PortRange, rng: random.Random | None = None) -> None:
        self.range = port_range
        self._rng = rng or random.Random()
        self._used: set[int] = set()

    def allocate(self, avoid: frozenset[int] = frozenset()) -> int:
        """A free port, not one of `avoid` (ports that failed to bind just now)."""
        size = self.range.size
        start = self._rng.randrange(size)
        for step in range(size):
            port = self.range.first + (start + step) % size
            if port not in self._used and port not in avoid:
                self._used.add(port)
                return port
        raise ExhaustedError(f"--proxy-port-range {self.range}: all {size} ports are in use")

    def release(self, port: int) -> None:
        self._used.discard(port)


class AddressAllocator:
    """One IP per service from --bind-range, stable across restarts.

    A service's first choice is a hash of namespace/name into the range, so
    the same service gets the same IP every run while the range has room;
    a collision moves on to the next free address.
    """

    def __init__(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.network = network
        usable = network.num_addresses
        # Skip the network and broadcast addresses of ranges that have them.
        self._offset = 1 if usable > 2 else 0
        self._count = usable - 2 if usable > 2 else usable
        self._by_service: dict[ObjectName, str] = {}
        self._taken: dict[str, ObjectName] = {}
        self._first = int(network.network_address) + self._offset
        self._address = type(network.network_address)
        self._v4 = network.version == 4

    def _candidate(self, index: int) -> str:
        # From an integer: the ipaddress arithmetic (`address + n`) this
        # replaces was a sixth of binding 10k laptop-mode listeners, and
        # str(IPv4Address) still 4 us of the ~30 per listener; this is 0.5.
        if self._v4:
            n = self._first + index
            return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        return str(self._address(self._first + index))

    def allocate(self, service: ObjectName, avoid: frozenset[str] = frozenset()) -> str:
        known = self._by_service.get(service)
        if known is not None and known not in avoid:
            return known
        if known is not None:
            self.release(service)
        digest = hashlib.sha256(str(service).encode()).digest()
        start = int.from_bytes(digest[:8], "big") % self._count
        for step in range(self._count):
            address = self._candidate((start + step) % self._count)
            if address not in self._taken and address not in avoid:
                self._taken[address] = service
                self._by_service[service] = address
                return address
        raise ExhaustedError(f"--bind-range {self.network}: all {self._count} addresses are in use")

    def release(self, service: ObjectName) -> None:
        address = self._by_service.pop(service, None)
        if address is not None:
            self._taken.pop(address, None)
