"""The conntrack lookup's netlink messages, byte by byte (pure)."""

from __future__ import annotations

import socket
import struct

from uproxy.conntrack import (
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    NLA_F_NESTED,
    Conntrack,
    _attr,
    lookup_request,
    original_of,
)


def test_the_request_asks_by_the_reply_direction() -> None:
    message = lookup_request(7, socket.IPPROTO_UDP, ("10.0.0.1", 40053), ("10.0.0.9", 5353))
    length, kind, flags, sequence, port_id = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, sequence, port_id) == (len(message), 0x0101, 1, 7, 0)
    assert message[16:20] == bytes([socket.AF_INET, 0, 0, 0])
    tuple_ip = _attr(CTA_TUPLE_IP | NLA_F_NESTED,
                     _attr(CTA_IP_V4_SRC, socket.inet_aton("10.0.0.1"))
                     + _attr(CTA_IP_V4_DST, socket.inet_aton("10.0.0.9")))
    tuple_proto = _attr(CTA_TUPLE_PROTO | NLA_F_NESTED,
                        _attr(CTA_PROTO_NUM, b"\x11")
                        + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", 40053))
                        + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", 5353)))
    assert message[20:] == _attr(CTA_TUPLE_REPLY | NLA_F_NESTED, tuple_ip + tuple_proto)
    assert len(message) % 4 == 0


def test_the_answer_gives_the_original_destination() -> None:
    def direction(kind: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        return _attr(kind | NLA_F_NESTED,
                     _attr(CTA_TUPLE_IP | NLA_F_NESTED,
                           _attr(CTA_IP_V4_SRC, socket.inet_aton(src))
                           + _attr(CTA_IP_V4_DST, socket.inet_aton(dst)))
                     + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED,
                             _attr(CTA_PROTO_NUM, b"\x11")
                             + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
                             + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))))
    body = (bytes(4) + direction(CTA_TUPLE_ORIG, "10.0.0.9", "198.18.1.53", 5353, 30053)
            + direction(CTA_TUPLE_REPLY, "10.0.0.1", "10.0.0.9", 40053, 5353))
    message = struct.pack("=IHHII", 16 + len(body), 0x0100, 0, 7, 0) + body
    assert original_of(message) == (socket.inet_aton("198.18.1.53"), 30053)
    assert original_of(message[:24]) is None  # cut short: no answer, not an exception


def test_families_that_cannot_match_are_not_asked() -> None:
    conntrack = Conntrack()
    assert conntrack.udp_original_destination(("10.0.0.1", 1), ("fd00::9", 2)) is None
    assert conntrack._sock is None  # not even opened
