"""UDP relay: a session per client address, replies from the address it used.

Each (client address, local address) pair gets a session: a socket connected
to the endpoint picked for the client, whose replies go back through the
listener. Two ways in, picked by how the listener is bound:

- bound to one address (laptop mode, `--bind-address IP`): the loop's plain
  datagram transport reads it (uvloop loops recvmsg in C and calls
  `datagram_received` per datagram; no EAGAIN surfaces in Python), and
  replies are sent with sendto on the same socket: they leave from that
  address.
- bound to a wildcard (0.0.0.0 or ::): recvmmsg (`relay.mmsg`), up to BATCH
  datagrams a call into one arena the process shares (a callback hands every
  datagram on before it returns), with IP_PKTINFO / IPV6_RECVPKTINFO: the
  local destination of each datagram. The reply carries the same ancillary
  data, so it leaves from the address the client sent to (a REDIRECTed
  client would otherwise see the wrong source and drop it). A datagram's raw
  source and local address are its session key, decoded only when a session
  opens.

On a wildcard listener a run of datagrams from one client in one read, of
one size (the last may be shorter), goes to the endpoint in one send with
UDP_SEGMENT (GSO): the kernel cuts it back into the same datagrams, for about
a third of the cost of separate sends on loopback. The listener also asks
for UDP_GRO, so a client that sends with GSO (QUIC stacks do) arrives as one
buffer and leaves as one. A route that refuses UDP_SEGMENT (segments above
its MTU, no checksum offload) makes that session send one by one.

Measured and left out (bench S4, a burst load; proxy CPU per datagram): the
recvmmsg path on bound listeners (ctypes and per-datagram parsing in Python
cost more than uvloop's C loop of recvmsg: 14.3-15.0 vs 13.5-13.8 us a round
trip), and queuing replies of many sessions for one sendmmsg per loop
iteration (level in S4, worse in bursts: the syscall it saves costs less than
the Python that fills the headers). A reply goes back as soon as it is read.

A service port whose external traffic has endpoints of its own
(`externalTrafficPolicy: Local`) looks up each new session's original
destination in the connection tracker (`uproxy.conntrack`; UDP has no
SO_ORIGINAL_DST): a cluster IP, or no NAT entry, is cluster traffic;
a node port, an external IP or a load-balancer IP is external and picks with
`pick_external`. Other ports never look.

Replies: a session's socket is read one datagram per readiness callback
(the loop polls level-triggered, so more queued datagrams call again), which
never pays for a recv that fails with EAGAIN, the right trade for request
and response. Every PROBE_EVERY-th read is a recvmmsg instead; when it finds
more than one reply waiting, the endpoint sends in bursts (a download over
QUIC, a stream) and the session reads every reply that way from then on,
with UDP_GRO on: a run of one size, or what the kernel coalesced, goes back
to the client in one UDP_SEGMENT send (with the pktinfo that picks its
source on a wildcard listener). A session that bursts stays batched: with
UDP_GRO on, a plain recv could return coalesced datagrams as one.

The session table is bounded (`max_sessions`). A datagram only stamps its
session's `last`; a sweep, at most every eighth of the timeout, ends the
sessions idle longer than the timeout. A full table evicts the least recently
used of the oldest few sessions. Datagrams up to 64 KiB pass whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Hashable
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
GSO_SEGMENTS = 64  # datagrams per UDP_SEGMENT send (the kernel's UDP_MAX_SEGMENTS)
GSO_BYTES = 65000  # bytes per UDP_SEGMENT send: under the 65,507 one IPv4 datagram holds
GSO_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.ENOPROTOOPT,
                         errno.EOPNOTSUPP})
DRAIN_IDLE = 1.0  # after stop_accepting, a session idle this long is done
SOCKET_BUFFER = 1024 * 1024  # a few whole 64 KiB datagrams fit
EVICT_SCAN = 8  # a full table evicts the least recently used of this many oldest sessions
PROBE_EVERY = 16  # a session reading replies one at a time tries a batch this often

# A bound listener: the client's address as the transport reports it. A
# wildcard listener: the client's raw sockaddr as recvmmsg reports it, then the
# raw local address it sent to (decoded only when a session opens).
SessionKey = Hashable

_receiver: mmsg.Receiver | None = None


def shared_receiver() -> mmsg.Receiver:
    """The process's listener read buffers: every listener's callback hands all
    it read on before returning, so one set serves them all (made on first use)."""
    global _receiver
    if _receiver is None:
        _receiver = mmsg.Receiver(BATCH, control=True)
    return _receiver


class _Session:
    __slots__ = ("batched", "client", "cmsg", "fd", "gso", "key", "last", "reads", "reply_gso",
                 "server", "sock")

    def __init__(self, server: UdpServer, key: SessionKey, client: tuple[object, ...],
                 sock: socket.socket, cmsg: list[tuple[int, int, bytes]], now: float) -> None:
        self.server = server
        self.key = key
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.cmsg = cmsg  # ancillary data that sets the reply's source address
        self.last = now
        self.gso = True  # until the route to the endpoint refuses UDP_SEGMENT
        self.reply_gso = True  # the same for the route back to the client
        self.reads = 0  # replies read one at a time
        self.batched = False  # replies come in bursts: read them with recvmmsg

    def on_readable(self) -> None:
        """Replies from the endpoint: send them back to the client."""
        if self.batched:
            self._read_batch()
            return
        self.reads = reads = self.reads + 1
        if not reads % PROBE_EVERY:
            # Now and then read in a batch: more than one waiting means the
            # endpoint sends in bursts, read in batches from now on.
            if self._read_batch() > 1:
                self.batched = True
                with contextlib.suppress(OSError):  # since Linux 5.0
                    self.sock.setsockopt(mmsg.SOL_UDP, mmsg.UDP_GRO, 1)
            return
        server = self.server
        try:
            data = self.sock.recv(mmsg.MAX_DATAGRAM)
        except OSError:  # EAGAIN, or an ICMP unreachable from the endpoint reported late
            return
        listener = server.sock
        if listener is not None and self._reply(listener, data):
            self.last = server.now()

    def _read_batch(self) -> int:
        """Up to BATCH replies in one recvmmsg; a run of one size (or what UDP_GRO
        coalesced) goes to the client in one UDP_SEGMENT send. How many were read."""
        receiver = shared_receiver()
        try:
            count = receiver.receive(self.fd)
        except OSError:  # a late ICMP error from the endpoint
            return 0
        listener = self.server.sock
        if not count or listener is None:
            return count
        messages = receiver.messages(count)
        sent = False
        i = 0
        while i < count:
            data, _, _, segment = messages[i]
            if segment:
                sent |= self._reply_run(listener, data, segment)
                i += 1
                continue
            end = _run_end(messages, i)
            if end - i > 1:
                payload = memoryview(b"".join(message[0] for message in messages[i:end]))
                sent |= self._reply_run(listener, payload, len(data))
            else:
                sent |= self._reply(listener, data)
            i = end
        if sent:
            self.last = self.server.now()
        return count

    def _reply(self, listener: socket.socket, data: bytes | memoryview) -> bool:
        """One reply to the client, from the address it sent to."""
        stats = self.server.stats
        try:
            if self.cmsg:
                listener.sendmsg([data], self.cmsg, 0, self.client)
            else:
                listener.sendto(data, self.client)
        except OSError:
            stats.udp_datagrams_dropped += 1
            return False
        stats.udp_datagrams_out += 1
        stats.bytes_out += len(data)
        return True

    def _reply_run(self, listener: socket.socket, payload: memoryview, size: int) -> bool:
        """Replies of `size` bytes back to back (the last may be shorter): one
        UDP_SEGMENT send, or one by one where the route cannot."""
        if self.reply_gso:
            try:
                listener.sendmsg([payload], [*self.cmsg, (mmsg.SOL_UDP, mmsg.UDP_SEGMENT,
                                                          struct.pack("=H", size))],
                                 0, self.client)
            except OSError as exc:
                if exc.errno in GSO_REFUSED:
                    self.reply_gso = False
            else:
                stats = self.server.stats
                stats.udp_datagrams_out += -(-len(payload) // size)
                stats.bytes_out += len(payload)
                return True
        sent = False
        for start in range(0, len(payload), size):
            sent |= self._reply(listener, payload[start:start + size])
        return sent


class _Listener(asyncio.DatagramProtocol):
    """The datagram transport's protocol for a listener bound to one address."""

    __slots__ = ("server",)

    def __init__(self, server: UdpServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        self.server.datagram(data, addr, addr, self.server.local_ip)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: %s", self.server.name, exc)


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
        self._transport: asyncio.DatagramTransport | None = None
        self._opening: asyncio.Task[None] | None = None
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
            with contextlib.suppress(OSError):  # since Linux 5.0
                sock.setsockopt(mmsg.SOL_UDP, mmsg.UDP_GRO, 1)
            loop.add_reader(self.fd, self._on_readable)
            self._reading = True
        else:
            # Making the transport is a coroutine; datagrams wait in the
            # socket's buffer meanwhile. One task per listener, at start.
            self._opening = loop.create_task(self._open_transport(sock))

    async def _open_transport(self, sock: socket.socket) -> None:
        assert self.loop is not None
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Listener(self), sock=sock)
        except OSError as exc:
            log.error("%s: cannot read the listener: %s", self.name, exc)
            return
        finally:
            self._opening = None
        self._transport = transport
        if not self.accepting:
            self._close_transport()

    def _close_transport(self) -> None:
        """Stop reading: a duplicate descriptor keeps the address for replies."""
        transport, self._transport = self._transport, None
        if transport is None or self.sock is None:
            return
        with contextlib.suppress(OSError):
            self.sock = self.sock.dup()  # the transport closes the original
        transport.close()

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
        self._close_transport()

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
        """Wildcard listener: read up to BATCH messages with their local
        addresses; a run of equal-sized datagrams from one client goes on in
        one send (GSO)."""
        if self.sock is None:
            return
        receiver = shared_receiver()
        try:
            count = receiver.receive(self.fd)
        except OSError as exc:
            log.debug("%s: recv failed: %s", self.name, exc)
            return
        messages = receiver.messages(count)
        sessions = self.sessions
        i = 0
        while i < count:
            data, source, local, segment = messages[i]
            key = source + local
            after = i + 1
            if segment:
                self.datagrams([data], segment, key, source, local)
            elif after < count and messages[after][1] == source and (
                    after := _run_end(messages, i)) > i + 1:
                views = [message[0] for message in messages[i:after]]
                self.datagrams(views, len(data), key, source, local)
            else:  # the usual case: one datagram from this client in this read
                session = sessions.get(key)
                if session is None:
                    self.datagram(data, key, *self._client(source, local))
                else:
                    self._send(session, data)
            i = after

    def _client(self, source: bytes, local: bytes) -> tuple[tuple[object, ...], str]:
        """A raw source address and local address as a session opens with them."""
        return mmsg.decode_address(source), mmsg.local_ip(local) if local else self.local_ip

    def datagram(self, data: bytes | memoryview, key: SessionKey, addr: tuple[object, ...],
                 local_ip: str) -> None:
        """One datagram from the client at `addr`, sent to `local_ip`."""
        session = self.sessions.get(key)
        if session is None:
            if not self.accepting:
                return
            session = self._open(key, addr, local_ip)
            if session is None:
                self.stats.udp_datagrams_dropped += 1
                return
        self._send(session, data)

    def _send(self, session: _Session, data: bytes | memoryview) -> None:
        stats = self.stats
        try:
            session.sock.send(data)
        except OSError:
            # EAGAIN (buffer full) or a late ICMP error: UDP may drop.
            stats.udp_datagrams_dropped += 1
            return
        stats.udp_datagrams_in += 1
        stats.bytes_in += len(data)
        session.last = self.now()

    def datagrams(self, views: list[memoryview], size: int, key: SessionKey, source: bytes,
                  local: bytes) -> None:
        """Datagrams of `size` bytes (the last may be shorter) from one client,
        in `views` one each, or in one view back to back (coalesced by UDP_GRO):
        one send with UDP_SEGMENT keeps their boundaries, and costs the kernel
        one pass where separate sends cost one each."""
        payload = views[0] if len(views) == 1 else memoryview(b"".join(views))
        session = self.sessions.get(key)
        if session is None:  # the first one opens the session, or is dropped, as if alone
            addr, local_ip = self._client(source, local)
            self.datagram(payload[:size], key, addr, local_ip)
            payload = payload[size:]
            session = self.sessions.get(key)
            if session is None:
                for start in range(0, len(payload), size):
                    self.datagram(payload[start:start + size], key, addr, local_ip)
                return
            if not payload:
                return
        if session.gso:
            try:
                session.sock.sendmsg([payload], [(mmsg.SOL_UDP, mmsg.UDP_SEGMENT,
                                                  struct.pack("=H", size))])
            except OSError as exc:
                # This route cannot (segments above its MTU, no checksum
                # offload): one by one from now on. Other errors (a full
                # buffer, a late ICMP error) may spare some one by one.
                if exc.errno in GSO_REFUSED:
                    session.gso = False
            else:
                stats = self.stats
                stats.udp_datagrams_in += -(-len(payload) // size)
                stats.bytes_in += len(payload)
                session.last = self.now()
                return
        for start in range(0, len(payload), size):
            self._send(session, payload[start:start + size])

    def _open(self, key: SessionKey, addr: tuple[object, ...], local_ip: str) -> _Session | None:
        assert self.loop is not None
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
        session = _Session(self, key, addr, sock, self._reply_cmsg(local_ip), self.now())
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

    def _reply_cmsg(self, local_ip: str) -> list[tuple[int, int, bytes]]:
        if not self.wildcard:
            return []
        if self.family == socket.AF_INET6:
            address = socket.inet_pton(socket.AF_INET6, local_ip)
            return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", address, 0))]
        address = socket.inet_pton(socket.AF_INET, local_ip)
        # in_pktinfo: ifindex 0 (routing decides), spec_dst = source to use.
        return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, address, bytes(4)))]

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
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _run_end(messages: list[tuple[memoryview, bytes, bytes, int]], first: int) -> int:
    """Where the run of datagrams starting at `first` ends: the next ones from
    the same client to the same address, of the same size (the last may be
    shorter), up to what one UDP_SEGMENT send takes."""
    data, source, local, _ = messages[first]
    size = total = len(data)
    end = first + 1
    if not size:
        return end
    while end < len(messages) and end - first < GSO_SEGMENTS:
        data, next_source, next_local, segment = messages[end]
        length = len(data)
        if (segment or next_source != source or next_local != local or not length
                or length > size or total + length > GSO_BYTES):
            break
        total += length
        end += 1
        if length < size:
            break
    return end


def _last_used(session: _Session) -> float:
    return session.last


def _never() -> float:
    return 0.0
