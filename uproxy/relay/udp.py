"""UDP relay: a session per client address, replies from the address it used.

Each (client address, local address) pair gets a session: a socket connected
to the endpoint picked for the client, whose replies go back through the
listener. The listener is read with recvmmsg, up to BATCH datagrams per
readiness callback (`relay.mmsg`), into one arena the process shares (a
callback hands every datagram on before it returns); a datagram's raw source
address is its session key, decoded only when a session opens.

- bound to one address (laptop mode, `--bind-address IP`): replies leave from
  that address.
- bound to a wildcard (0.0.0.0 or ::): IP_PKTINFO / IPV6_RECVPKTINFO tells
  the local destination of each datagram, and the session's replies carry
  the same ancillary data, so they leave from the address the client sent to
  (a REDIRECTed client would otherwise see the wrong source and drop it).

Replies are queued in the listener's `Sender` as sessions read them and sent
with one sendmmsg per loop iteration (or sooner, when the queue is full), in
the order they were read, so a client's replies keep their order.

A service port whose external traffic has endpoints of its own
(`externalTrafficPolicy: Local`) looks up each new session's original
destination in the connection tracker (`uproxy.conntrack`; UDP has no
SO_ORIGINAL_DST): a cluster IP, or no NAT entry, is cluster traffic;
a node port, an external IP or a load-balancer IP is external and picks with
`pick_external`. Other ports never look.

A session's socket is read one datagram per readiness callback (the loop
polls level-triggered, so more queued datagrams call again), which never pays
for a recv that fails with EAGAIN.

The session table is bounded (`max_sessions`). A datagram only stamps its
session's `last`; a sweep, at most every eighth of the timeout, ends the
sessions idle longer than the timeout. A full table evicts the least recently
used of the oldest few sessions. Datagrams up to 64 KiB pass whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

from uproxy.conntrack import CONNTRACK
from uproxy.picking import NoEndpointsError, Picker
from uproxy.relay import mmsg
from uproxy.stats import PortStats

log = logging.getLogger("uproxy.relay")

IP_PKTINFO = mmsg.IP_PKTINFO
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = mmsg.IPV6_PKTINFO
BATCH = 64  # datagrams per listener readiness callback before others get a turn
SEND_SLOTS = 64  # replies queued per listener before a sendmmsg, at most
SEND_ARENA = 256 * 1024  # bytes queued per listener (an anonymous mapping, touched as used)
DRAIN_IDLE = 1.0  # after stop_accepting, a session idle this long is done
SOCKET_BUFFER = 1024 * 1024  # a few whole 64 KiB datagrams fit
EVICT_SCAN = 8  # a full table evicts the least recently used of this many oldest sessions

# The client's raw sockaddr as recvmmsg reports it; on a wildcard listener,
# followed by the raw local address it sent to.
SessionKey = bytes

_receiver: mmsg.Receiver | None = None


def shared_receiver() -> mmsg.Receiver:
    """The process's listener read buffers: every listener's callback hands all
    it read on before returning, so one set serves them all (made on first use)."""
    global _receiver
    if _receiver is None:
        _receiver = mmsg.Receiver(BATCH, control=True)
    return _receiver


class _Session:
    __slots__ = ("client", "control", "control_at", "fd", "key", "last", "name", "name_at",
                 "server", "sock")

    def __init__(self, server: UdpServer, key: SessionKey, name: bytes,
                 client: tuple[object, ...], sock: socket.socket, control: bytes,
                 now: float) -> None:
        self.server = server
        self.key = key
        self.name = name  # the client's raw sockaddr: where replies go
        self.name_at = mmsg.bytes_address(name)
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.control = control  # ancillary data that sets the reply's source address
        self.control_at = mmsg.bytes_address(control) if control else 0
        self.last = now

    def on_readable(self) -> None:
        """One reply from the endpoint: queue it for the client."""
        sender = self.server.sender()
        if sender is None:  # the listener is closed: read and forget
            with contextlib.suppress(OSError):
                self.sock.recv(mmsg.MAX_DATAGRAM)
            return
        try:
            length = self.sock.recv_into(sender.space())
        except OSError:  # EAGAIN, or an ICMP unreachable from the endpoint reported late
            return
        sender.push(length, self.name_at, len(self.name), self.control_at, len(self.control))
        self.last = self.server.now()
        self.server.replied()


class UdpServer:
    """Serves one bound UDP socket for one service port."""

    protocol = "UDP"

    def __init__(
        self,
        sock: socket.socket,
        picker: Picker,
        stats: PortStats,
        *,
        session_timeout: float = 30.0,
        max_sessions: int = 4096,
        name: str = "",
    ) -> None:
        if session_timeout <= 0:
            raise ValueError(f"session_timeout: must be positive, got {session_timeout}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions: must be at least 1, got {max_sessions}")
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.picker = picker
        self.stats = stats
        self.session_timeout = session_timeout
        self.max_sessions = max_sessions
        self.family = sock.family
        local = sock.getsockname()
        self.name = name or f"udp {local[0]}:{local[1]}"
        self.wildcard = local[0] in ("0.0.0.0", "::")
        self.local_ip = str(local[0])
        self.port = int(local[1])
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: dict[SessionKey, _Session] = {}
        self.draining = False
        self.accepting = False
        self._reading = False
        self._sender: mmsg.Sender | None = None  # made with the first session
        self._flush: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle: asyncio.Future[None] | None = None
        self.now: Callable[[], float] = _never  # the loop's clock once started

    def start(self) -> None:
        sock = self.sock
        assert sock is not None, "UDP server already closed"
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.loop = loop = asyncio.get_running_loop()
        self.now = loop.time
        self.accepting = True
        if self.wildcard:
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        loop.add_reader(self.fd, self._on_readable)
        self._reading = True

    def stop_accepting(self) -> None:
        """Stop reading new datagrams; open sessions may still get replies.

        Sessions then end after DRAIN_IDLE of idleness (or the session timeout,
        if shorter); `drain` waits for that and `abort` ends them at once. The
        listening socket is closed when the last session ends.
        """
        self._stop_reading()
        self.draining = True
        if not self.sessions:
            self._close_listener()
        else:
            self._arm(0.0)

    def _stop_reading(self) -> None:
        self.accepting = False
        if self._reading and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
        self._reading = False

    async def drain(self, timeout: float) -> None:
        if self.sessions:
            loop = asyncio.get_running_loop()
            if self._idle is None or self._idle.done():
                self._idle = loop.create_future()
            await asyncio.wait({self._idle}, timeout=timeout)
        if self.draining:
            self.abort()

    def abort(self) -> None:
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for session in sessions:
            self._end(session)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.draining = True
        self._stop_reading()
        self._close_listener()

    @property
    def open_connections(self) -> int:
        """Sessions open now (what a listener's server counts as open; relay.server)."""
        return len(self.sessions)

    # -- datagrams from clients -------------------------------------------------

    def _on_readable(self) -> None:
        """Read up to BATCH datagrams; each goes on to its session's endpoint."""
        if self.sock is None:
            return
        receiver = shared_receiver()
        try:
            count = receiver.receive(self.fd)
        except OSError as exc:
            log.debug("%s: recv failed: %s", self.name, exc)
            return
        wildcard = self.wildcard
        for i in range(count):
            data, source, local = receiver.message(i)
            self.datagram(data, source + local if wildcard else source, source, local)

    def datagram(self, data: memoryview, key: SessionKey, source: bytes, local: bytes) -> None:
        """One datagram from the client at raw address `source`, sent to the
        raw local address `local` (empty when the listener's own address)."""
        stats = self.stats
        session = self.sessions.get(key)
        if session is None:
            if not self.accepting:
                return
            session = self._open(key, source, local)
            if session is None:
                stats.udp_datagrams_dropped += 1
                return
        try:
            session.sock.send(data)
        except OSError:
            # EAGAIN (buffer full) or a late ICMP error: UDP may drop.
            stats.udp_datagrams_dropped += 1
            return
        stats.udp_datagrams_in += 1
        stats.bytes_in += len(data)
        session.last = self.now()

    def _open(self, key: SessionKey, source: bytes, local: bytes) -> _Session | None:
        assert self.loop is not None
        addr = mmsg.decode_address(source)
        local_ip = mmsg.local_ip(local) if local else self.local_ip
        stats = self.stats
        picker = self.picker
        client_ip = cast(str, addr[0])
        try:
            if picker.split.active and self._external(addr, local_ip):
                endpoint = picker.pick_external(client_ip)
            else:
                endpoint = picker.pick(client_ip)
        except NoEndpointsError:
            stats.no_endpoints += 1
            return None
        if len(self.sessions) >= self.max_sessions:
            self._evict()
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            log.warning("%s: cannot open a session for %s: %s", self.name, addr[0], exc)
            return None
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.connect((endpoint.ip, endpoint.port))
        except OSError as exc:
            sock.close()
            log.warning("%s: cannot reach %s: %s", self.name, endpoint, exc)
            return None
        session = _Session(self, key, source, addr, sock, self._reply_control(local_ip),
                           self.now())
        if self._sender is None:
            self._sender = mmsg.Sender(SEND_SLOTS, SEND_ARENA)
        self.sessions[key] = session
        self.loop.add_reader(session.fd, session.on_readable)
        stats.udp_sessions_created += 1
        stats.udp_sessions_active += 1
        if self._timer is None:
            self._arm(self.session_timeout)
        return session

    def _external(self, addr: tuple[object, ...], local_ip: str) -> bool:
        """Whether a new session's first datagram came from outside (a node
        port, an external IP, a load-balancer IP), by its conntrack entry."""
        found = CONNTRACK.udp_original_destination(
            (local_ip, self.port), (cast(str, addr[0]), cast(int, addr[1])))
        if found is None or found[1] == self.port:
            return False  # no NAT: sent to the listener itself
        return self.picker.split.is_external(found[0])

    def _evict(self) -> None:
        """Make room: end the least recently used of the oldest few sessions."""
        sessions = self.sessions
        scanned: list[_Session] = []
        for session in sessions.values():
            scanned.append(session)
            if len(scanned) >= EVICT_SCAN:
                break
        victim = min(scanned, key=_last_used)
        for session in scanned:  # the rest were used later: to the back of the order
            del sessions[session.key]
            if session is not victim:
                sessions[session.key] = session
        self._end(victim)
        self.stats.udp_sessions_expired += 1

    def _reply_control(self, local_ip: str) -> bytes:
        """Ancillary data that makes a reply leave from `local_ip` (wildcard
        listeners only; a bound listener's replies leave from its address)."""
        if not self.wildcard:
            return b""
        if self.family == socket.AF_INET6:
            address = socket.inet_pton(socket.AF_INET6, local_ip)
            return mmsg.control_message(socket.IPPROTO_IPV6, IPV6_PKTINFO,
                                        struct.pack("=16sI", address, 0))
        address = socket.inet_pton(socket.AF_INET, local_ip)
        # in_pktinfo: ifindex 0 (routing decides), spec_dst = source to use.
        return mmsg.control_message(socket.IPPROTO_IP, IP_PKTINFO,
                                    struct.pack("=i4s4s", 0, address, bytes(4)))

    # -- replies to clients -----------------------------------------------------------

    def sender(self) -> mmsg.Sender | None:
        """Where a session queues a reply (flushed first if full); None once
        the listener is closed."""
        sender = self._sender
        if sender is None or self.sock is None:
            return None
        if sender.full:
            self.flush()
        return sender

    def replied(self) -> None:
        """A reply was queued: send the queue once this round of callbacks is done."""
        if self._flush is None and self.loop is not None:
            self._flush = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send the queued replies, in order, and count them."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        sender = self._sender
        if sender is None or not sender.count:
            return
        if self.sock is None:
            sender.discard()
            return
        sent, sent_bytes, dropped = sender.flush(self.fd)
        stats = self.stats
        stats.udp_datagrams_out += sent
        stats.bytes_out += sent_bytes
        stats.udp_datagrams_dropped += dropped

    # -- session lifetime -----------------------------------------------------------

    def _timeout(self) -> float:
        return min(self.session_timeout, DRAIN_IDLE) if self.draining else self.session_timeout

    def _arm(self, delay: float) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        """End every session idle longer than the timeout; sweep again when the
        next one would expire, but not sooner than an eighth of the timeout."""
        assert self.loop is not None
        self._timer = None
        timeout = self._timeout()
        now = self.loop.time()
        deadline = now - timeout
        sessions = self.sessions
        idle = [session for session in sessions.values() if session.last <= deadline]
        for session in idle:
            del sessions[session.key]
            self._end(session)
        self.stats.udp_sessions_expired += len(idle)
        if sessions:
            oldest = min(session.last for session in sessions.values())
            self._arm(max(oldest + timeout - now, timeout / 8))
        elif self.draining:
            self._close_listener()

    def _end(self, session: _Session) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(session.fd)
        session.sock.close()
        self.stats.udp_sessions_active -= 1
        if not self.sessions and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _close_listener(self) -> None:
        self.flush()  # replies already read still go
        self._sender = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _last_used(session: _Session) -> float:
    return session.last


def _never() -> float:
    return 0.0
