"""TCP relay: accept, dial the endpoint at once, move bytes both ways.

Per connection there is no Task, no coroutine, no asyncio handle and no
callback object: a `_Conn` with two `_Pump`s (all `__slots__`) is driven by one
edge-triggered epoll set per event loop (`relay.poller`, which also keeps the
dial deadlines). Each socket is added to the set once and leaves it when
closed, so a connection costs two epoll_ctl calls in all (the loop's
add_reader/remove_reader per direction cost twelve, half of them failing, and
an object per descriptor). Modes:

- "auto" (default): each direction copies through one shared buffer
  (recv_into + send, no allocation unless the destination is full) and
  switches to splice once it has moved `promote_after` bytes and turns bulk:
  one read brings BULK_READ bytes or more, or the destination is full. A
  keep-alive connection of small requests never pays for a pipe, however
  many bytes it moves. Pipes come from a bounded shared pool.
- "splice": each direction moves socket -> pipe -> socket with splice(2) from
  the first byte.
- "protocol": the two sockets become asyncio transports joined by a Protocol
  pair with backpressure (`relay.pair`; making the transports is one task).
- "sockmap": copies like "auto" (never splicing) until the connection has
  shown it is not a one-shot: both directions moved bytes and nothing waits
  in userspace. Then both sockets join the process's SOCKHASH
  (`uproxy.bpf.sockmap`) and the kernel moves every further byte; the
  sockets stay in the epoll set only to see EOF, resets and errors. An EOF
  is passed on (shutdown(SHUT_WR) on the other socket) once TCP_INFO shows
  every byte the source received was written into the destination, so no
  FIN overtakes redirected bytes; byte counts come from TCP_INFO too
  (`relay.tcpinfo`). Without the privilege or kernel support the mode falls
  back to "auto" with one warning.

A client whose endpoint is reached through the API server's port-forward
(`--dial`) is handed to `portforward.connection` instead.

A service port whose external traffic has endpoints of its own
(`externalTrafficPolicy: Local`) is told so by its picker's `split`; only
then does an accepted connection cost one more syscall: getsockopt
SO_ORIGINAL_DST (IPv4, also for an IPv4 client of a dual-stack listener) or
IP6T_SO_ORIGINAL_DST (IPv6) gives the address the client dialled before
REDIRECT/DNAT. A cluster IP is cluster traffic; anything else (a node port,
an external IP, a load-balancer IP) is external and is picked with
`pick_external`, also on a retry. A connection with no NAT entry, or whose
original destination is the listener's own port, reached the listener
directly (laptop mode) and counts as cluster traffic.

All modes honour half-close: EOF from one side becomes shutdown(SHUT_WR) on
the other once buffered bytes are flushed, and the other direction keeps
flowing; when the second direction ends, close() sends its FIN. An error or a
reset on either side resets both (SO_LINGER 0).

Edge-triggered rules kept here: a direction reads until EAGAIN, or until a
short read (the queue was empty), or until a short read on a socket that
reported RDHUP (that was the last data: EOF without another recv). It writes
until EAGAIN or a short send (TCP then signals EPOLLOUT when space frees). A
direction that used its ROUNDS and may have more is re-run from call_soon.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import cast

from uproxy.bpf.sockmap import SockMap, fell_back, sockmap
from uproxy.model import Endpoint
from uproxy.picking import DIAL_TIMEOUTS, NoEndpointsError, Picker, TrafficSplit
from uproxy.portforward.connection import PortForwardConnection, Relay
from uproxy.proxyheader import proxy_header
from uproxy.relay.accept import AcceptLoop
from uproxy.relay.joined import Joined
from uproxy.relay.pair import Side, start_pair
from uproxy.relay.poller import (
    CLOSED,
    DIALLING,
    EPOLLERR,
    EPOLLHUP,
    EPOLLOUT,
    EPOLLRDHUP,
    OPEN,
    READABLE,
    WATCH,
    WATCH_READ,
    Poller,
    poller_for,
)
from uproxy.relay.splice import POOL, SPLICE_FLAGS, Pipe, PipePool
from uproxy.stats import PortStats

log = logging.getLogger("uproxy.relay")

MODES = ("splice", "protocol", "sockmap", "auto")
COPY_CHUNK = 256 * 1024
PROMOTE_AFTER = 256 * 1024  # bytes one direction moves before it may switch to splice
BULK_READ = 64 * 1024  # a read this large says the sender outpaces us: bulk
ROUNDS = 16  # chunks a direction moves per turn before it lets others run
_LINGER_RESET = struct.pack("ii", 1, 0)

_DONTWAIT = socket.MSG_DONTWAIT
_LAST = socket.MSG_DONTWAIT | socket.MSG_MORE
_STREAM = socket.SOCK_STREAM
_NONBLOCK_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_SOL_SOCKET = socket.SOL_SOCKET
_SO_ERROR = socket.SO_ERROR
_SHUT_WR = socket.SHUT_WR
_EINPROGRESS = errno.EINPROGRESS
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE})
_SOL_IP = socket.IPPROTO_IP
_SOL_IPV6 = socket.IPPROTO_IPV6
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; Python has no constant
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28

# One copy buffer per process: the loop is single-threaded and a chunk leaves
# it (sent, or copied into the connection when the destination is full)
# before the next recv.
_BUFFER = bytearray(COPY_CHUNK)
_VIEW = memoryview(_BUFFER)


Sock = _socket.socket
AccessLog = Callable[[dict[str, object]], None]


def original_destination(sock: Sock, peer_ip: str) -> tuple[bytes, int] | None:
    """(packed IP, port) the client dialled before the kernel's NAT sent it
    here, or None when no NAT entry exists (a direct connection)."""
    try:
        if sock.family == socket.AF_INET or peer_ip.startswith("::ffff:"):
            raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
            return raw[4:8], int.from_bytes(raw[2:4], "big")
        raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        return raw[8:24], int.from_bytes(raw[2:4], "big")
    except OSError:  # ENOENT: no conntrack entry
        return None


def reset_close(sock: Sock) -> None:
    """Close with an RST instead of a FIN: the peer sees ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class TcpServer:
    """Serves one bound, listening TCP socket for one service port."""

    protocol = "TCP"

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
        forward: Relay | None = None,
        proxy_protocol: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"relay mode {mode!r}: expected one of {', '.join(MODES)}")
        self.sockmap: SockMap | None = None
        if mode == "sockmap":
            self.sockmap = sockmap()
            if self.sockmap is None:
                fell_back(log)
                mode = "auto"
        if not dial_timeouts:
            raise ValueError("dial_timeouts: needs at least one attempt")
        self.picker = picker
        self.stats = stats
        self.mode = mode
        self.dial_timeouts = tuple(dial_timeouts)
        self.name = name or _sockname(sock)
        self.access_log = access_log
        self.promote_after = promote_after if mode == "auto" else -1
        self.pipes = POOL if pipes is None else pipes
        # --dial portforward|auto: endpoints its routes name are reached through
        # the API server's port-forward, by a PortForwardConnection.
        self.forward = forward
        # A PROXY protocol header (uproxy.proxyheader) goes to the endpoint
        # before any client byte: 1 or 2, 0 for none.
        self.proxy_protocol = proxy_protocol
        self.family = sock.family
        self.loop: asyncio.AbstractEventLoop | None = None
        self.poller: Poller | None = None
        self._listener = sock
        self.split = picker.split
        self.pick_external = picker.pick_external
        self._port = -1  # the listener's own port, read when first needed (_own_port)
        self._accept = AcceptLoop(sock, self._on_accepted, stats, self.name)
        # A dict as an ordered set: at 10k connections a set's table was 512 KB,
        # a dict's 288 KB (S5 counts bytes per idle connection).
        self._conns: dict[_Conn | PortForwardConnection, None] = {}
        self._idle: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.poller = poller_for(self.loop)
        self.poller.users += 1
        # Accepted sockets inherit TCP_NODELAY from the listener: one syscall
        # per listener instead of one per connection.
        with contextlib.suppress(OSError):
            self._listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._accept.start()

    def stop_accepting(self) -> None:
        self._accept.stop()
        self._maybe_release()

    def _maybe_release(self) -> None:
        """Stopped and idle: let go of the loop's poller (the last user closes it)."""
        poller = self.poller
        if poller is not None and not self._conns and self._accept.stopped:
            self.poller = None
            poller.release()

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

    def _own_port(self) -> int:
        """The listener's port: a connection whose original destination has
        another one came through NAT (a portal). One getsockname, when first
        asked: most listeners never are, and 10k of them open in one sync."""
        if self._port < 0:
            self._port = _port_of(self._listener)
        return self._port

    # -- called by connections ------------------------------------------------

    def _on_accepted(self, fd: int, addr: tuple[object, ...]) -> None:
        stats = self.stats
        stats.connections_accepted += 1
        # The C-level socket type: no Python __init__, and a blocking fd is
        # fine because every recv/send passes MSG_DONTWAIT.
        client = Sock(self.family, _STREAM, 0, fd)
        # The client's address stays with the connection: one shared string per
        # client IP instead of one per connection (64 bytes of S5's ~1 KiB).
        client_ip = sys.intern(cast(str, addr[0]))
        addr = (client_ip, *addr[1:])
        split = self.split
        external = split.active and self._external(client, addr, split)
        try:
            endpoint = self.pick_external(client_ip) if external else self.picker.pick(client_ip)
        except NoEndpointsError:
            stats.no_endpoints += 1
            reset_close(client)
            self._log_access(addr, None, "no_endpoints", 0, 0, 0.0, 0.0, 0)
            return
        stats.connections_active += 1
        header = self._header(client, addr) if self.proxy_protocol else None
        forward = self.forward
        if forward is not None and forward.routes.via_portforward(endpoint):
            self._forwarded(client, addr, endpoint, external, header=header)
            return
        conn = _Conn(self, client, addr, endpoint)
        conn.header = header
        if external:
            conn.external = True
        self._conns[conn] = None
        conn.dial()

    def _header(self, client: Sock, addr: tuple[object, ...]) -> bytes:
        """The PROXY header of a connection: the client, and the address it dialled
        (the original destination through NAT, else the listener's own)."""
        found = original_destination(client, cast(str, addr[0]))
        if found is not None and found[1] != self._own_port():
            destination = (str(ipaddress.ip_address(found[0])), found[1])
        else:
            local = client.getsockname()
            destination = (str(local[0]), int(local[1]))
        return proxy_header(self.proxy_protocol, (str(addr[0]), int(cast(int, addr[1]))),
                            destination)

    def _forwarded(self, client: Sock, addr: tuple[object, ...], endpoint: Endpoint,
                   external: bool, *, attempt: int = 0, started: float | None = None,
                   header: bytes | None = None) -> None:
        """Serve a client through port-forward (see uproxy.portforward.connection)."""
        assert self.forward is not None
        pick = self.pick_external if external else self.picker.pick

        def pick_again(client_ip: str, reset_affinity: bool) -> Endpoint:
            return pick(client_ip, reset_affinity=reset_affinity)

        sock = socket.socket(self.family, _STREAM, 0, client.detach())
        conn = PortForwardConnection(self, self.forward, sock, addr, endpoint, pick_again,
                                     attempt=attempt, started=started, header=header)
        self._conns[conn] = None
        conn.start()

    def _hand_over(self, conn: _Conn) -> None:
        """A direct dial's failover picked an endpoint reached through port-forward."""
        self._conns.pop(conn, None)
        conn.state = CLOSED
        self._forwarded(conn.client, conn.addr, conn.endpoint, conn.external,
                        attempt=conn.attempt, started=conn.started, header=conn.header)

    def _external(self, client: Sock, addr: tuple[object, ...], split: TrafficSplit) -> bool:
        """Whether a connection came from outside (see the module's docstring)."""
        found = original_destination(client, cast(str, addr[0]))
        if found is None or found[1] == self._own_port():
            return False
        return split.is_external(found[0])

    def _closed(self, conn: _Conn | PortForwardConnection) -> None:
        self._conns.pop(conn, None)
        stats = self.stats
        stats.connections_active -= 1
        bytes_in, bytes_out = conn.bytes_moved()
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if self.access_log is not None:
            self._log_access(
                conn.addr, conn.endpoint, conn.outcome, bytes_in, bytes_out, conn.dial_seconds,
                time.monotonic() - conn.started, conn.attempt + 1,
            )
        if not self._conns:
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            if self._accept.stopped:
                self._maybe_release()

    def _log_access(self, addr: tuple[object, ...], endpoint: Endpoint | None,
                    outcome: str, bytes_in: int, bytes_out: int, dial_seconds: float,
                    duration: float, attempts: int) -> None:
        if self.access_log is None:
            return
        self.access_log({
            "service": self.name,
            "client": f"{addr[0]}:{addr[1]}",
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


def _port_of(sock: socket.socket) -> int:
    try:
        return int(sock.getsockname()[1])
    except (OSError, IndexError, TypeError, ValueError):
        return 0


def _established(sock: Sock) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: the handshake is still on its way
        return False
    return True


class _Conn:
    """One client connection: dialling, then two pumps (or a protocol pair)."""

    __slots__ = (
        "addr", "attempt", "cfd", "client", "client_out", "dial_seconds", "dial_started", "down",
        "endpoint", "external", "header", "joined", "outcome", "poller", "server", "sides",
        "started", "state", "task", "ufd", "up", "upstream", "upstream_out",
    )

    def __init__(self, server: TcpServer, client: Sock, addr: tuple[object, ...],
                 endpoint: Endpoint) -> None:
        assert server.poller is not None
        self.server = server
        self.poller = server.poller
        self.client = client
        self.cfd = client.fileno()
        self.addr = addr
        self.endpoint = endpoint
        self.upstream: Sock | None = None
        self.ufd = -1
        self.client_out = False  # the client is watched for EPOLLOUT too
        self.upstream_out = False  # the same for the endpoint
        self.attempt = 0
        self.external = False  # came from outside: retries pick external endpoints too
        self.state = DIALLING
        self.started = self.dial_started = time.monotonic()
        self.dial_seconds = 0.0
        self.up: _Pump | None = None  # client -> endpoint
        self.down: _Pump | None = None  # endpoint -> client
        self.sides: tuple[Side, Side] | None = None
        self.task: asyncio.Task[None] | None = None  # protocol mode: making the pair
        self.header: bytes | None = None  # PROXY protocol, sent first to every endpoint
        self.outcome = "ok"
        self.joined: Joined | None = None  # --relay sockmap: the kernel moves the bytes

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def family(self) -> int:
        return self.server.family

    def finished(self) -> None:
        self.server._closed(self)

    def bytes_moved(self) -> tuple[int, int]:
        sides = self.sides
        if sides is not None:
            return sides[0].moved, sides[1].moved
        up, down = self.up, self.down
        return (0 if up is None else up.moved), (0 if down is None else down.moved)

    # -- dialling ---------------------------------------------------------------

    def dial(self) -> None:
        """Start one connect attempt to `self.endpoint` (non-blocking)."""
        if self.state != DIALLING:
            return
        endpoint = self.endpoint
        server = self.server
        self.dial_started = time.monotonic()
        try:
            upstream = Sock(socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET,
                            _NONBLOCK_STREAM)
        except OSError as exc:  # out of descriptors: no point retrying at once
            server.stats.connections_failed += 1
            log.debug("%s: cannot dial %s: %s", server.name, endpoint, exc)
            server._accept.pause(exc)
            self.fail("dial_failed")
            return
        with contextlib.suppress(OSError):
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = upstream
        self.ufd = upstream.fileno()
        err = upstream.connect_ex((endpoint.ip, endpoint.port))
        if err == 0 or (err == _EINPROGRESS and _established(upstream)):
            # Over loopback the handshake is done inside connect(): go on
            # without waiting a loop turn for EPOLLOUT.
            if server.mode != "protocol":
                self.poller.watch(self.ufd, self, WATCH_READ)
            self._connected()
        elif err == _EINPROGRESS:
            self.upstream_out = True
            self.poller.watch(self.ufd, self, WATCH)
            self.poller.dial_deadline(self, server.dial_timeouts[self.attempt])
        else:
            self._attempt_failed(os.strerror(err))

    def dial_timed_out(self) -> None:
        self._attempt_failed("timed out")

    def _attempt_failed(self, why: str) -> None:
        server = self.server
        stats = server.stats
        stats.dial_attempts_failed += 1
        upstream = self.upstream
        if upstream is not None:
            self.poller.forget(self.ufd)
            upstream.close()
            self.upstream = None
            self.ufd = -1
        log.debug("%s: dial %s for %s failed (attempt %d): %s",
                  server.name, self.endpoint, self.addr[0], self.attempt + 1, why)
        if self.attempt + 1 < len(server.dial_timeouts):
            self.attempt += 1
            try:
                pick = server.pick_external if self.external else server.picker.pick
                self.endpoint = pick(cast(str, self.addr[0]), reset_affinity=True)
            except NoEndpointsError:
                pass
            else:
                forward = server.forward
                if forward is not None and forward.routes.via_portforward(self.endpoint):
                    server._hand_over(self)
                    return
                # Not from inside an epoll batch: a new socket may get the
                # number of one closed in this batch, whose event is pending.
                self.poller.loop.call_soon(self.dial)
                return
        stats.connections_failed += 1
        log.info("%s: no endpoint answered for %s after %d attempts (last %s: %s)",
                 server.name, self.addr[0], self.attempt + 1, self.endpoint, why)
        self.fail("dial_failed")

    def _connected(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        now = time.monotonic()
        server = self.server
        if server.access_log is not None:  # only the access log reads it: no float kept else
            self.dial_seconds = now - self.started
        server.stats.record_dial(now - self.dial_started)
        self.state = OPEN
        header = self.header
        if header is not None:
            # Before any client byte. A fresh connection's send buffer is empty,
            # so a header of at most 232 bytes leaves whole at once.
            try:
                sent = upstream.send(header, _DONTWAIT)
            except OSError:
                sent = -1
            if sent != len(header):
                self.fail("error")
                return
        if server.mode == "protocol":
            if self.poller.forget(self.ufd) is not None:
                self.poller.epoll.unregister(self.ufd)
            self.task = start_pair(self.poller.loop, self)
            return
        splice_now = server.mode == "splice"
        client = self.client
        self.up = up = _Pump(self, client, upstream, splice_now)
        self.down = _Pump(self, upstream, client, splice_now)
        # The client's request is usually here already: move it now, then
        # watch the client (adding it reports whatever arrives meanwhile).
        up.readable = True
        up.run()
        if self.state == OPEN:
            self.poller.watch(self.cfd, self, WATCH_READ)

    # -- readiness ---------------------------------------------------------------

    def on_event(self, fd: int, mask: int) -> None:
        if self.joined is not None:
            if self.state == OPEN:
                self.joined.on_event(fd, mask)
            return
        if self.state != OPEN:
            if self.state == DIALLING and fd == self.ufd:
                if mask & (EPOLLERR | EPOLLHUP):
                    upstream = self.upstream
                    assert upstream is not None
                    err = upstream.getsockopt(_SOL_SOCKET, _SO_ERROR)
                    self._attempt_failed(os.strerror(err) if err else "hung up")
                elif mask & EPOLLOUT:
                    self._connected()
                    if mask & READABLE and self.down is not None and self.state == OPEN:
                        self.on_event(fd, mask & ~EPOLLOUT)  # the endpoint spoke first
            return
        if mask & EPOLLERR:
            self.fail("reset")
            return
        up = self.up
        down = self.down
        assert up is not None and down is not None
        if fd == self.cfd:
            reader, writer = up, down
        else:
            reader, writer = down, up
        if mask & READABLE:
            reader.readable = True
            if mask & EPOLLRDHUP:
                reader.rdhup = True
        if mask & EPOLLOUT:
            writer.writable = True
            if writer.pending is not None or writer.in_pipe:
                writer.run()
                if self.state != OPEN:
                    return
        if mask & READABLE:
            reader.run()
        sockmap = self.server.sockmap
        # Join between two reads that emptied both queues: the kernel must
        # never be handed an skb userspace has read part of.
        if (sockmap is not None and up.moved and down.moved and up.pending is None
                and down.pending is None and not (up.readable or down.readable or up.eof
                                                  or down.eof or up.done or down.done)
                and self.state == OPEN):
            self._join(sockmap)

    # -- sockmap: the kernel moves the bytes ----------------------------------------

    def _join(self, sockmap: SockMap) -> None:
        """Both directions have moved bytes and nothing waits here: hand over."""
        upstream = self.upstream
        assert upstream is not None and self.up is not None and self.down is not None
        try:
            self.joined = Joined(self, sockmap)
        except OSError as exc:  # e.g. the map is full: keep copying
            log.warning("%s: cannot join the sockmap, copying from now on: %s",
                        self.server.name, exc)
            self.server.sockmap = None

    def _count_joined(self, joined: Joined) -> None:
        """The bytes each way, from the kernel's counts (before closing)."""
        up, down = self.up, self.down
        assert up is not None and down is not None
        with contextlib.suppress(OSError):
            up.moved, down.moved = joined.end()

    # -- ending -----------------------------------------------------------------

    def close(self) -> None:
        """Both directions finished: close() sends the last FIN."""
        if self.state == CLOSED:
            return
        if self.joined is not None:
            self._count_joined(self.joined)
        self.state = CLOSED
        self._release()
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.server._closed(self)

    def fail(self, outcome: str) -> None:
        """An error, reset or abort: reset both sides."""
        if self.state == CLOSED:
            return
        if self.joined is not None:
            self._count_joined(self.joined)
        self.state = CLOSED
        if self.outcome == "ok":
            self.outcome = outcome
        sides = self.sides
        if sides is not None:
            # Protocol mode: a socket wrapped in a transport belongs to the loop.
            for side, sock in zip(sides, (self.client, self.upstream), strict=True):
                if side.transport is not None:
                    side.abort()
                elif sock is not None:
                    reset_close(sock)
            self.server._closed(self)
            return
        self._release()
        reset_close(self.client)
        if self.upstream is not None:
            reset_close(self.upstream)
        self.server._closed(self)

    def _release(self) -> None:
        poller = self.poller
        poller.forget(self.cfd)
        poller.forget(self.ufd)
        for pump in (self.up, self.down):
            if pump is not None and pump.pipe is not None:
                pump.release()


class _Pump:
    """Moves bytes one way, src -> dst, by copying or by splicing."""

    __slots__ = (
        "conn", "done", "dst", "eof", "in_pipe", "moved", "pending", "pipe", "rdhup",
        "readable", "src", "thorough", "writable",
    )

    def __init__(self, conn: _Conn, src: Sock, dst: Sock, splice_now: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pending: bytes | None = None  # copied bytes dst did not take yet
        self.pipe: Pipe | None = None
        self.in_pipe = 0  # bytes sitting in the pipe
        self.moved = 0
        self.readable = False
        self.writable = True
        self.rdhup = False
        self.eof = False
        self.done = False
        self.thorough = False  # read until EAGAIN or EOF, whatever the sizes
        if splice_now:
            self._take_pipe()

    def _take_pipe(self) -> bool:
        try:
            self.pipe = self.conn.server.pipes.get()
        except OSError:
            return False  # out of descriptors: keep copying
        # splice(2) honours only the socket's own O_NONBLOCK (the accepted
        # client is blocking until now: copies pass MSG_DONTWAIT).
        for sock in (self.src, self.dst):
            if sock.gettimeout() != 0.0:
                sock.setblocking(False)
        return True

    def run(self) -> None:
        if self.done:
            return
        try:
            if self.pipe is None:
                self._copy()
            else:
                self._splice()
        except OSError as exc:
            self.conn.fail("reset" if exc.errno in _RESET_ERRNOS else "error")

    def _copy(self) -> None:
        dst = self.dst
        pending = self.pending
        if pending is not None:
            if not self.writable:
                return
            try:
                sent = dst.send(pending, _DONTWAIT)
            except BlockingIOError:
                self._blocked()
                return
            self.moved += sent
            if sent < len(pending):
                self.pending = pending[sent:]
                self._blocked()
                return
            self.pending = None
            # The destination was full: bulk.
            if 0 <= self.conn.server.promote_after <= self.moved and self._take_pipe():
                self._splice()
                return
        src = self.src
        for _ in range(ROUNDS):
            if not self.readable:
                if self.eof:
                    self._finish()
                return
            try:
                got = src.recv_into(_BUFFER, COPY_CHUNK, _DONTWAIT)
            except BlockingIOError:
                self.readable = False
                return
            if got < COPY_CHUNK and (got == 0 or not self.thorough):
                # The queue was empty after this read; after RDHUP that was
                # the last of it, and recv would only say EOF. (Not so on a
                # socket in a sockmap, `thorough`: one read returns what the
                # kernel queued on the socket's psock, the next what waits in
                # its receive queue.)
                self.readable = False
                if got == 0 or self.rdhup:
                    self.eof = True
                if got == 0:
                    self._finish()
                    return
            try:
                # Last bytes before the FIN: MSG_MORE holds them so that the
                # FIN rides on the same segment (one packet less each way).
                sent = dst.send(_VIEW[:got], _LAST if self.eof else _DONTWAIT)
            except BlockingIOError:
                sent = 0
            self.moved += sent
            if sent < got:
                self.pending = bytes(_VIEW[sent:got])
                self._blocked()
                return
            if (got >= BULK_READ and 0 <= self.conn.server.promote_after <= self.moved
                    and self._take_pipe()):
                self._splice()
                return
        if self.readable:
            self.conn.poller.later(self)
        elif self.eof:
            self._finish()

    def _splice(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        splice = os.splice
        src_fd = self.src.fileno()
        dst_fd = self.dst.fileno()
        for _ in range(ROUNDS):
            if self.in_pipe:
                if not self.writable:
                    return
                try:
                    sent = splice(pipe.read_fd, dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    self._blocked()
                    return
                self.in_pipe -= sent
                self.moved += sent
                continue  # a short splice is retried: EAGAIN says the socket is full
            if not self.readable:
                if self.eof:
                    self._finish()
                return
            try:
                got = splice(src_fd, pipe.write_fd, pipe.size, flags=SPLICE_FLAGS)
            except BlockingIOError:
                # The pipe is empty here, so EAGAIN means the socket is.
                self.readable = False
                continue
            if got == 0:
                self.readable = False
                self.eof = True
                continue
            self.in_pipe += got
        self.conn.poller.later(self)

    def _blocked(self) -> None:
        """The destination is full: wait for EPOLLOUT (ask for it on the client)."""
        self.writable = False
        conn = self.conn
        if self.dst is conn.client:
            if not conn.client_out:
                conn.client_out = True
                conn.poller.epoll.modify(conn.cfd, WATCH)
        elif not conn.upstream_out:
            conn.upstream_out = True
            conn.poller.epoll.modify(conn.ufd, WATCH)

    def _finish(self) -> None:
        """EOF read and everything flushed: pass the FIN on."""
        self.done = True
        conn = self.conn
        if conn.joined is not None:
            conn.joined.copied_to_end(self)
            return
        other = conn.down if self is conn.up else conn.up
        if other is not None and other.done:
            conn.close()
            return
        try:
            self.dst.shutdown(_SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                conn.fail("reset")

    def release(self) -> None:
        """Give the pipe back (the connection is closing)."""
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            self.conn.server.pipes.put(pipe, empty=self.in_pipe == 0)
