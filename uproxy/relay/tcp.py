"""TCP relay: accept, dial the endpoint at once, move bytes both ways.

Per connection there is no Task and no coroutine on the fast paths: a
`_Conn` state object with `__slots__` is driven by readiness callbacks on the
raw non-blocking sockets (the accept loop, the dial, and one `_Pump` per
direction). Modes:

- "splice": each direction moves socket -> pipe -> socket with splice(2).
- "auto": each direction starts with recv/send (no pipe to set up for a short
  request/response) and switches to splice once it has moved
  `promote_after` bytes; pipes come from a bounded shared pool.
- "protocol": the two sockets become asyncio transports joined by a Protocol
  pair with backpressure (a peer above its high-water mark pauses reading on
  this side). Wrapping sockets into transports needs one short Task.

All modes honour half-close: EOF from one side becomes shutdown(SHUT_WR) on
the other once buffered bytes are flushed, and the other direction keeps
flowing. An error or a reset on either side resets both (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import cast

from uproxy.model import Endpoint
from uproxy.relay.accept import AcceptLoop
from uproxy.relay.base import DIAL_TIMEOUTS, NoEndpointsError, Picker
from uproxy.relay.splice import POOL, SPLICE_FLAGS, Pipe, PipePool
from uproxy.stats import PortStats

log = logging.getLogger("uproxy.relay")

MODES = ("splice", "protocol", "auto")
COPY_CHUNK = 256 * 1024
PROMOTE_AFTER = 256 * 1024  # bytes one direction moves before it switches to splice
ROUNDS = 16  # chunks a direction moves per callback before it lets others run
HIGH_WATER = 256 * 1024  # protocol mode write buffer limits
LOW_WATER = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)

AccessLog = Callable[[dict[str, object]], None]


def reset_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: the peer sees ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpServer:
    """Serves one bound, listening TCP socket for one service port."""

    def __init__(
        self,
        sock: socket.socket,
        picker: Picker,
        stats: PortStats,
        *,
        mode: str = "auto",
        dial_timeouts: Sequence[float] = DIAL_TIMEOUTS,
        name: str = "",
        access_log: AccessLog | None = None,
        promote_after: int = PROMOTE_AFTER,
        pipes: PipePool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"relay mode {mode!r}: expected one of {', '.join(MODES)}")
        if not dial_timeouts:
            raise ValueError("dial_timeouts: needs at least one attempt")
        self.picker = picker
        self.stats = stats
        self.mode = mode
        self.dial_timeouts = tuple(dial_timeouts)
        self.name = name or _sockname(sock)
        self.access_log = access_log
        self.promote_after = promote_after
        self.pipes = POOL if pipes is None else pipes
        self.loop: asyncio.AbstractEventLoop | None = None
        self._accept = AcceptLoop(sock, self._on_accepted, stats, self.name)
        self._conns: set[_Conn] = set()
        self._idle: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._accept.start()

    def stop_accepting(self) -> None:
        self._accept.stop()

    async def drain(self, timeout: float) -> None:
        if not self._conns:
            return
        loop = asyncio.get_running_loop()
        if self._idle is None or self._idle.done():
            self._idle = loop.create_future()
        await asyncio.wait({self._idle}, timeout=timeout)

    def abort(self) -> None:
        for conn in list(self._conns):
            conn.fail("aborted")

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def accept_paused(self) -> bool:
        return self._accept.paused

    # -- called by connections ------------------------------------------------

    def _on_accepted(self, client: socket.socket, addr: tuple[object, ...]) -> None:
        stats = self.stats
        stats.connections_accepted += 1
        client.setblocking(False)
        client_ip = str(addr[0])
        try:
            endpoint = self.picker.pick(client_ip)
        except NoEndpointsError:
            stats.no_endpoints += 1
            reset_close(client)
            self._log_access(client_ip, addr, None, "no_endpoints", 0, 0, 0.0, 0.0, 0)
            return
        conn = _Conn(self, client, addr, endpoint)
        self._conns.add(conn)
        stats.connections_active += 1
        conn.dial()

    def _closed(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        stats = self.stats
        stats.connections_active -= 1
        stats.bytes_in += conn.bytes_in
        stats.bytes_out += conn.bytes_out
        if self.access_log is not None:
            self._log_access(
                conn.client_ip, conn.addr, conn.endpoint, conn.outcome, conn.bytes_in,
                conn.bytes_out, conn.dial_seconds, time.monotonic() - conn.started,
                conn.attempt + 1,
            )
        if not self._conns and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _log_access(self, client_ip: str, addr: tuple[object, ...], endpoint: Endpoint | None,
                    outcome: str, bytes_in: int, bytes_out: int, dial_seconds: float,
                    duration: float, attempts: int) -> None:
        if self.access_log is None:
            return
        self.access_log({
            "service": self.name,
            "client": f"{client_ip}:{addr[1]}",
            "endpoint": str(endpoint) if endpoint is not None else None,
            "outcome": outcome,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "dial_seconds": round(dial_seconds, 6),
            "duration": round(duration, 6),
            "attempts": attempts,
        })


def _sockname(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "tcp"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _Conn:
    """One client connection: dialling, then two pumps (or a protocol pair)."""

    __slots__ = (
        "addr", "attempt", "bytes_in", "bytes_out", "client", "client_ip", "dial_seconds",
        "dial_started", "done", "endpoint", "loop", "outcome", "pumps", "server", "sides",
        "started", "timer", "upstream",
    )

    def __init__(self, server: TcpServer, client: socket.socket, addr: tuple[object, ...],
                 endpoint: Endpoint) -> None:
        assert server.loop is not None
        self.server = server
        self.loop = server.loop
        self.client = client
        self.addr = addr
        self.client_ip = str(addr[0])
        self.endpoint = endpoint
        self.upstream: socket.socket | None = None
        self.attempt = 0
        self.timer: asyncio.TimerHandle | None = None
        self.started = self.dial_started = time.monotonic()
        self.dial_seconds = 0.0
        self.pumps: tuple[_Pump, _Pump] | None = None
        self.sides: tuple[_Side, _Side] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcome = "ok"
        self.done = False

    # -- dialling ---------------------------------------------------------------

    def dial(self) -> None:
        """Start one connect attempt to `self.endpoint` (non-blocking)."""
        endpoint = self.endpoint
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        self.dial_started = time.monotonic()
        try:
            upstream = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: no point retrying at once
            self.outcome = "dial_failed"
            self.server.stats.connections_failed += 1
            log.debug("%s: cannot dial %s: %s", self.server.name, endpoint, exc)
            self.server._accept.pause(exc)
            self.fail("dial_failed")
            return
        upstream.setblocking(False)
        self.upstream = upstream
        err = upstream.connect_ex((endpoint.ip, endpoint.port))
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            self.loop.add_writer(upstream.fileno(), self._on_connect_ready)
            self.timer = self.loop.call_later(
                self.server.dial_timeouts[self.attempt], self._on_dial_timeout)
        else:
            self._attempt_failed(os.strerror(err))

    def _on_connect_ready(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        self.loop.remove_writer(upstream.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected()
        else:
            self._attempt_failed(os.strerror(err))

    def _on_dial_timeout(self) -> None:
        self.timer = None
        upstream = self.upstream
        assert upstream is not None
        self.loop.remove_writer(upstream.fileno())
        self._attempt_failed("timed out")

    def _attempt_failed(self, why: str) -> None:
        server = self.server
        stats = server.stats
        stats.dial_attempts_failed += 1
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        log.debug("%s: dial %s for %s failed (attempt %d): %s",
                  server.name, self.endpoint, self.client_ip, self.attempt + 1, why)
        if self.attempt + 1 < len(server.dial_timeouts):
            self.attempt += 1
            try:
                self.endpoint = server.picker.pick(self.client_ip, reset_affinity=True)
            except NoEndpointsError:
                pass
            else:
                self.dial()
                return
        stats.connections_failed += 1
        log.info("%s: no endpoint answered for %s after %d attempts (last %s: %s)",
                 server.name, self.client_ip, self.attempt + 1, self.endpoint, why)
        self.fail("dial_failed")

    def _connected(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        now = time.monotonic()
        self.dial_seconds = now - self.started
        self.server.stats.record_dial(now - self.dial_started)
        _nodelay(self.client)
        _nodelay(upstream)
        mode = self.server.mode
        if mode == "protocol":
            task = self.loop.create_task(self._wrap())
            task.add_done_callback(_ignore_result)
            return
        splice_now = mode == "splice"
        self.pumps = (
            _Pump(self, self.client, upstream, True, splice_now),
            _Pump(self, upstream, self.client, False, splice_now),
        )
        for pump in self.pumps:
            pump.start()

    # -- protocol mode ------------------------------------------------------------

    async def _wrap(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        client_side = _Side(self, True)
        upstream_side = _Side(self, False)
        client_side.peer = upstream_side
        upstream_side.peer = client_side
        self.sides = (client_side, upstream_side)
        try:
            # connection_made may run later than the await returns (uvloop).
            client_side.transport, _ = await self.loop.connect_accepted_socket(
                lambda: client_side, sock=self.client)
            upstream_side.transport, _ = await self.loop.create_connection(
                lambda: upstream_side, sock=upstream)
        except (OSError, RuntimeError) as exc:
            log.warning("%s: cannot relay %s: %s", self.server.name, self.client_ip, exc)
            self.fail("error")
            return
        if self.done:  # aborted while the transports were being made
            client_side.abort()
            upstream_side.abort()
            return
        client_side.ready()
        upstream_side.ready()

    # -- ending -----------------------------------------------------------------

    def direction_done(self) -> None:
        """A pump reached EOF and half-closed its destination."""
        pumps = self.pumps
        assert pumps is not None
        if pumps[0].done and pumps[1].done:
            self.close()

    def close(self) -> None:
        """Both directions finished: a clean close with FINs already sent."""
        if self.done:
            return
        self.done = True
        self._release()
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.server._closed(self)

    def fail(self, outcome: str) -> None:
        """An error, reset or abort: reset both sides."""
        if self.done:
            return
        self.done = True
        if self.outcome == "ok":
            self.outcome = outcome
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sides = self.sides
        if sides is not None:
            # Protocol mode: a socket wrapped in a transport belongs to the loop.
            self.sides = None
            client_side, upstream_side = sides
            client_side.count()
            upstream_side.count()
            for side, sock in ((client_side, self.client), (upstream_side, self.upstream)):
                if side.transport is not None:
                    side.abort()
                elif sock is not None:
                    reset_close(sock)
            self.server._closed(self)
            return
        self._release()
        reset_close(self.client)
        if self.upstream is not None:
            if self.pumps is None:
                # Still dialling: the writer callback may be registered.
                self.loop.remove_writer(self.upstream.fileno())
            reset_close(self.upstream)
        self.server._closed(self)

    def _release(self) -> None:
        pumps = self.pumps
        if pumps is None:
            return
        for pump in pumps:
            pump.release()


def _ignore_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("relay task failed", exc_info=task.exception())


class _Pump:
    """Moves bytes one way, src -> dst, by copying or by splicing."""

    __slots__ = (
        "buf", "conn", "done", "dst", "dst_fd", "eof", "inbound", "loop", "moved", "no_pipe",
        "pending", "pipe", "reading", "src", "src_fd", "writing",
    )

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket, inbound: bool,
                 splice_now: bool) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.inbound = inbound  # client -> endpoint
        self.buf = b""
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes sitting in the pipe
        self.moved = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.no_pipe = False
        if splice_now:
            self._take_pipe()

    def start(self) -> None:
        self._run()

    def _take_pipe(self) -> bool:
        try:
            self.pipe = self.conn.server.pipes.get()
        except OSError:
            self.no_pipe = True  # out of descriptors: keep copying
            return False
        return True

    def _want_read(self) -> None:
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst_fd)
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.src_fd, self._run)

    def _want_write(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dst_fd, self._run)

    def _unwatch(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst_fd)

    def _run(self) -> None:
        if self.done:
            return
        try:
            if self.pipe is None:
                self._copy()
            else:
                self._splice()
        except OSError as exc:
            self.count()
            self.conn.fail("reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else "error")

    def _copy(self) -> None:
        src = self.src
        dst = self.dst
        for _ in range(ROUNDS):
            if self.buf:
                try:
                    sent = dst.send(self.buf)
                except (BlockingIOError, InterruptedError):
                    self._want_write()
                    return
                self.moved += sent
                self.buf = self.buf[sent:]
                if self.buf:
                    self._want_write()
                    return
            if self.eof:
                self._finish()
                return
            if (self.moved >= self.conn.server.promote_after and self.conn.server.mode == "auto"
                    and not self.no_pipe and self._take_pipe()):
                self._splice()
                return
            try:
                data = src.recv(COPY_CHUNK)
            except (BlockingIOError, InterruptedError):
                self._want_read()
                return
            if not data:
                self.eof = True
                continue
            self.buf = data
        self._want_read()

    def _splice(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        splice = os.splice
        for _ in range(ROUNDS):
            if self.pending:
                try:
                    sent = splice(pipe.read_fd, self.dst_fd, self.pending, flags=SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    self._want_write()
                    return
                self.pending -= sent
                self.moved += sent
                if self.pending:
                    continue
            if self.eof:
                self._finish()
                return
            try:
                got = splice(self.src_fd, pipe.write_fd, pipe.size, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                # The pipe is empty here, so EAGAIN means the socket is.
                self._want_read()
                return
            if got == 0:
                self.eof = True
                continue
            self.pending += got
        if self.pending:
            self._want_write()
        else:
            self._want_read()

    def _finish(self) -> None:
        self._unwatch()
        self.done = True
        self.count()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self.conn.fail("reset")
                return
        self.conn.direction_done()

    def count(self) -> None:
        moved, self.moved = self.moved, 0
        if self.inbound:
            self.conn.bytes_in += moved
        else:
            self.conn.bytes_out += moved

    def release(self) -> None:
        """Stop watching and give the pipe back (the connection is closing)."""
        self._unwatch()
        if not self.done:
            self.done = True
            self.count()
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            self.conn.server.pipes.put(pipe, empty=self.pending == 0)


class _Side(asyncio.Protocol):
    """One transport of a protocol-mode pair; writes what it reads to its peer."""

    __slots__ = ("conn", "early", "eof", "inbound", "lost", "moved", "peer", "transport")

    def __init__(self, conn: _Conn, inbound: bool) -> None:
        self.conn = conn
        self.inbound = inbound  # reads from the client
        self.peer: _Side | None = None
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
        if self.conn.done:
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
        if conn.done:
            return
        conn.done = True
        self.count()
        peer = self.peer
        assert peer is not None
        peer.count()
        for side in (self, peer):
            if side.transport is not None:
                side.transport.close()  # flushes, then closes
        conn.server._closed(conn)

    def count(self) -> None:
        moved, self.moved = self.moved, 0
        if self.inbound:
            self.conn.bytes_in += moved
        else:
            self.conn.bytes_out += moved

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
        if conn.done:
            return
        if exc is not None or not self.eof:
            # A reset, or closed without a FIN we saw: reset the other side too.
            self.count()
            peer = self.peer
            if peer is not None:
                peer.count()
            conn.fail("reset")

    def abort(self) -> None:
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()
