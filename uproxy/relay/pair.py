"""`--relay protocol`: the two sockets of a connection become asyncio
transports joined by a protocol pair with backpressure (a peer above its
high-water mark pauses reading on this side). Making the transports is a
coroutine; it runs as an ordinary task (`start_pair`).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import logging
import socket
import struct
from typing import Protocol, cast

from uproxy.relay.poller import CLOSED

log = logging.getLogger("uproxy.relay")

HIGH_WATER = 256 * 1024  # write buffer limits
LOW_WATER = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class PairConn(Protocol):
    """The connection a pair serves (relay.tcp's _Conn)."""

    state: int
    addr: tuple[object, ...]
    client: _socket.socket
    upstream: _socket.socket | None
    sides: tuple[Side, Side] | None

    @property
    def name(self) -> str:
        """The service port, for logs."""

    @property
    def family(self) -> int:
        """The client socket's address family."""

    def fail(self, outcome: str) -> None: ...

    def finished(self) -> None:
        """Both directions are done: the connection leaves its server."""


def start_pair(loop: asyncio.AbstractEventLoop, conn: PairConn) -> asyncio.Task[None]:
    """Wrap the connection's sockets into transports (a task); the pair then runs
    from the transports' callbacks."""
    return loop.create_task(_wrap(loop, conn), name=f"relay pair {conn.addr[0]}")


async def _wrap(loop: asyncio.AbstractEventLoop, conn: PairConn) -> None:
    upstream = conn.upstream
    assert upstream is not None
    client_side = Side(conn, True)
    upstream_side = Side(conn, False)
    client_side.peer = upstream_side
    upstream_side.peer = client_side
    conn.sides = (client_side, upstream_side)
    try:
        # Transports want socket.socket objects; these take over the fds.
        client_sock = socket.socket(conn.family, socket.SOCK_STREAM, 0, conn.client.detach())
        upstream_sock = socket.socket(upstream.family, socket.SOCK_STREAM, 0, upstream.detach())
        conn.client, conn.upstream = client_sock, upstream_sock
        # connection_made may run later than the await returns (uvloop).
        client_side.transport, _ = await loop.connect_accepted_socket(
            lambda: client_side, sock=client_sock)
        upstream_side.transport, _ = await loop.create_connection(
            lambda: upstream_side, sock=upstream_sock)
    except (OSError, RuntimeError) as exc:
        log.warning("%s: cannot relay %s: %s", conn.name, conn.addr[0], exc)
        conn.fail("error")
        return
    except Exception:  # a bug: the connection must not stay registered
        log.exception("%s: relay setup for %s failed", conn.name, conn.addr[0])
        conn.fail("error")
        return
    if conn.state == CLOSED:  # aborted while the transports were being made
        client_side.abort()
        upstream_side.abort()
        return
    client_side.ready()
    upstream_side.ready()


class Side(asyncio.Protocol):
    """One transport of a protocol-mode pair; writes what it reads to its peer."""

    __slots__ = ("conn", "early", "eof", "inbound", "lost", "moved", "peer", "transport")

    def __init__(self, conn: PairConn, inbound: bool) -> None:
        self.conn = conn
        self.inbound = inbound  # reads from the client
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] | None = []  # read before the peer's transport existed
        self.eof = False
        self.lost = False
        self.moved = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not registered as an asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if self.conn.state == CLOSED:
            self.abort()

    def ready(self) -> None:
        """Both transports exist: flush what arrived early."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        early, self.early = self.early, None
        if early:
            for data in early:
                self._forward(data)
        if self.eof:
            self._forward_eof()

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
            return
        self._forward(data)

    def _forward(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None and peer.transport is not None
        self.moved += len(data)
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.early is None:
            self._forward_eof()
        return True  # keep our write side open: half-close

    def _forward_eof(self) -> None:
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            self.conn_finished()

    def conn_finished(self) -> None:
        conn = self.conn
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        peer = self.peer
        assert peer is not None
        for side in (self, peer):
            if side.transport is not None:
                side.transport.close()  # flushes, then closes
        conn.finished()

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        conn = self.conn
        if conn.state == CLOSED:
            return
        if exc is not None or not self.eof:
            # A reset, or closed without a FIN we saw: reset the other side too.
            conn.fail("reset")

    def abort(self) -> None:
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()
