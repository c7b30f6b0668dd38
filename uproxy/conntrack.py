"""The original destination of a UDP datagram that NAT sent to a listener.

TCP has SO_ORIGINAL_DST; UDP has nothing like it: IP_PKTINFO and
IP_RECVORIGDSTADDR report the address after REDIRECT/DNAT, i.e. the
listener's own (tests/system/test_udp_external_policy.py measures both). The
kernel's connection tracker still knows the address the client sent to, so
a listener asks it, once per new UDP session and only for ports whose
external traffic has endpoints of its own (`externalTrafficPolicy: Local`):
one IPCTNL_MSG_CT_GET over NETLINK_NETFILTER, looked up by the reply
direction's tuple (listener address and port -> client address and port),
answered with the entry whose original direction holds the destination.

The kernel handles a netlink request inside the sendto() that carries it,
so the answer is already queued when sendto() returns: the lookup is two
syscalls on the loop, about 10 µs, with no waiting. It needs CAP_NET_ADMIN
(rules mode has it); without it, or without an entry (no NAT: laptop mode),
the answer is None and the datagram counts as cluster traffic.

A dozen lines of struct packing do what a netlink library would; the lookup
runs inside the datagram path, where a library's generic message objects
would cost more than the syscalls.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (big endian)
_ATTR = struct.Struct("=HH")  # nlattr: length, type


def _attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    """The attributes of one level, by type (the nested flag dropped)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + _ATTR.size:offset + length]
        offset += (length + 3) & ~3
    return found


def lookup_request(sequence: int, protocol: int, local: tuple[str, int],
                   client: tuple[str, int]) -> bytes:
    """A CT_GET for the entry whose reply direction runs local -> client."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    src_kind, dst_kind = ((CTA_IP_V6_SRC, CTA_IP_V6_DST) if family == socket.AF_INET6
                          else (CTA_IP_V4_SRC, CTA_IP_V4_DST))
    addresses = (_attr(src_kind, socket.inet_pton(family, local[0]))
                 + _attr(dst_kind, socket.inet_pton(family, client[0])))
    ports = (_attr(CTA_PROTO_NUM, bytes([protocol]))
             + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", local[1]))
             + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", client[1])))
    reply = _attr(CTA_TUPLE_REPLY | NLA_F_NESTED,
                  _attr(CTA_TUPLE_IP | NLA_F_NESTED, addresses)
                  + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, ports))
    body = _NFGEN.pack(family, 0, 0) + reply
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST, sequence, 0) + body


def original_of(message: bytes) -> tuple[bytes, int] | None:
    """(packed destination IP, port) of an entry's original direction."""
    entry = _attrs(message[_HEADER.size + _NFGEN.size:])
    original = _attrs(entry.get(CTA_TUPLE_ORIG, b""))
    ip = _attrs(original.get(CTA_TUPLE_IP, b""))
    ports = _attrs(original.get(CTA_TUPLE_PROTO, b""))
    address = ip.get(CTA_IP_V4_DST) or ip.get(CTA_IP_V6_DST)
    port = ports.get(CTA_PROTO_DST_PORT)
    if address is None or port is None or len(port) < 2:
        return None
    return address, struct.unpack("!H", port[:2])[0]


def _unmapped(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class Conntrack:
    """One netlink socket, opened at the first lookup; per process (workers too)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._sequence = 0
        self._broken = False  # no netlink here, or no CAP_NET_ADMIN: said once

    def udp_original_destination(self, local: tuple[str, int],
                                 client: tuple[str, int]) -> tuple[bytes, int] | None:
        """Where the client's datagram was sent before NAT, or None."""
        # An IPv4 client of a dual-stack listener: its conntrack entry is IPv4.
        local, client = (_unmapped(local[0]), local[1]), (_unmapped(client[0]), client[1])
        if (":" in local[0]) != (":" in client[0]):
            return None
        sock = self._socket()
        if sock is None:
            return None
        self._sequence = sequence = (self._sequence + 1) & 0xFFFFFFFF
        try:
            sock.send(lookup_request(sequence, socket.IPPROTO_UDP, local, client))
            while True:
                answer = sock.recv(8192, socket.MSG_DONTWAIT)
                _, kind, _, answered, _ = _HEADER.unpack_from(answer)
                if answered == sequence:
                    break
        except BlockingIOError:
            return None
        except OSError as error:
            self._fail(f"conntrack lookup failed: {error}")
            return None
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", answer, _HEADER.size)[0]
            if code == errno.EPERM:
                self._fail("conntrack lookup not permitted (needs CAP_NET_ADMIN)")
            return None  # ENOENT: no NAT entry, a datagram sent to the listener itself
        return original_of(answer)

    def _socket(self) -> socket.socket | None:
        if self._sock is None and not self._broken:
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.bind((0, 0))
            except OSError as error:
                self._fail(f"no conntrack netlink socket: {error}")
                return None
            self._sock = sock
        return self._sock

    def _fail(self, message: str) -> None:
        if not self._broken:
            log.warning("%s; UDP datagrams to node ports and external IPs use the cluster "
                        "endpoints", message)
        self._broken = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


CONNTRACK = Conntrack()  # the process's one
