"""Parsing of the value types the command line takes: durations, port ranges,
host:port bind addresses. Pure; errors are ValueError with a one-line reason."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """'250ms', '30s', '5m', '3h', or combined as Go writes them ('1m30s') -> seconds."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration; write e.g. 250ms, 30s, 5m or 3h")
    position = 0
    total = 0.0
    while position < len(value):
        match = _DURATION_PART.match(value, position)
        if match is None:
            if value.replace(".", "", 1).isdigit():
                raise ValueError(f"{text!r} needs a unit: ms, s, m or h (e.g. {value}s)")
            raise ValueError(f"{text!r} is not a duration; write e.g. 250ms, 30s, 5m or 3h")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of ports, as kube-proxy's --proxy-port-range."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def _port(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} {text!r} is not a number")
    number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError(f"{what} {number} is outside 1-65535")
    return number


def parse_port_range(text: str) -> PortRange:
    """'N' (one port), 'A-B' (inclusive) or 'A+K' (A to A+K)."""
    value = text.strip()
    if value in ("0-0", "0", "0+0"):
        raise ValueError(f"{text!r} is an empty port range")
    if "-" in value:
        low, _, high = value.partition("-")
        first, last = _port(low, "first port"), _port(high, "last port")
    elif "+" in value:
        low, _, extra = value.partition("+")
        first = _port(low, "first port")
        if not extra.isdigit():
            raise ValueError(f"port count {extra!r} is not a number")
        last = first + int(extra)
        if last > 65535:
            raise ValueError(f"{text!r} runs past port 65535")
    else:
        first = last = _port(value, "port")
    if last < first:
        raise ValueError(f"{text!r}: last port {last} is below first port {first}")
    return PortRange(first, last)


def parse_host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); port 0 allowed (pick one).

    HOST is an IP address; an empty HOST (':10249') means every IPv4 address
    (0.0.0.0) and 'localhost' means 127.0.0.1, as a listening address given
    to kube-proxy would.
    """
    value = text.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: port {port!r} is not a number 0-65535")
    if host == "localhost":
        return "127.0.0.1", int(port)
    if host:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host or "0.0.0.0", int(port)
