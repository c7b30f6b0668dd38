"""Byte counts the kernel keeps per TCP socket (TCP_INFO), for connections
whose bytes the kernel moves itself (`--relay sockmap`).

Offsets are those of `struct tcp_info` in linux/tcp.h (stable since 4.19):
tcpi_bytes_received at 128, tcpi_notsent_bytes at 144,
tcpi_bytes_sent at 200, tcpi_bytes_retrans at 208. Measured on 6.18:
bytes_received counts a received FIN as one byte and never the SYN;
bytes_sent counts data only (retransmissions too), so the bytes written into
a socket are bytes_sent - bytes_retrans + notsent_bytes until its own FIN is
queued.
"""

from __future__ import annotations

import _socket
import socket
import struct

TCP_INFO_LEN = 216
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def _info(sock: _socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)


def received(sock: _socket.socket, *, fin: bool) -> int:
    """Data bytes this socket has received from its peer; `fin`: its FIN came
    (the state cannot say: a socket that sent and then got a FIN is CLOSE, as
    after a reset; its TIME_WAIT is another object)."""
    return int(_U64.unpack_from(_info(sock), 128)[0]) - (1 if fin else 0)


def written(sock: _socket.socket) -> int:
    """Data bytes written into this socket, sent or not (before its FIN is queued)."""
    info = _info(sock)
    sent = _U64.unpack_from(info, 200)[0] - _U64.unpack_from(info, 208)[0]
    return int(sent + _U32.unpack_from(info, 144)[0])
