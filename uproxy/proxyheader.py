"""The PROXY protocol header (HAProxy's proxy-protocol.txt), v1 and v2, pure.

A service annotated `uproxy/proxy-protocol: v1|v2` gets this header in front
of every connection to its endpoints, so they see the client's address:

- v1, text: `PROXY TCP4 SRC DST SPORT DPORT\\r\\n` (TCP6 for IPv6);
- v2, binary: the 12-byte signature, 0x21 (version 2, PROXY), 0x11 (TCP over
  IPv4) or 0x21 (TCP over IPv6), the address block's length (big-endian),
  then source and destination addresses and ports.

An IPv4 client of a dual-stack listener arrives as `::ffff:a.b.c.d`: it is
written as IPv4. When one side is IPv4 and the other IPv6, both are written
as IPv6 (the IPv4 one mapped), as the header carries one family.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

Address = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _unmapped(ip: str) -> _IP:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_family(source: _IP, destination: _IP) -> tuple[_IP, _IP]:
    if source.version == destination.version:
        return source, destination
    as_v6 = [ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")
             for ip in (source, destination)]
    return as_v6[0], as_v6[1]


def proxy_header(version: int, source: Address, destination: Address) -> bytes:
    """The header for a connection from `source` to `destination` (IP, port)."""
    src, dst = _same_family(_unmapped(source[0]), _unmapped(destination[0]))
    if version == 1:
        name = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {name} {src} {dst} {source[1]} {destination[1]}\r\n".encode()
    if version == 2:
        block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
        family = 0x11 if src.version == 4 else 0x21  # TCP over AF_INET / AF_INET6
        command = 0x21  # version 2, PROXY
        return V2_SIGNATURE + bytes((command, family)) + struct.pack("!H", len(block)) + block
    raise ValueError(f"PROXY protocol version {version}: only 1 and 2 exist")
