"""UDP relay: a session per client address, replies from the address it used.

Each (client address, local address) pair gets a session: a socket connected
to the endpoint picked for the client, whose replies go back through the
listener. A listener bound to a wildcard (0.0.0.0 or ::) learns the local
destination of each datagram with IP_PKTINFO / IPV6_RECVPKTINFO and replies
with the same ancillary data, so the reply leaves from the address the client
sent to (a REDIRECTed client would otherwise see the wrong source and drop
it). A listener bound to one address needs none of this.

Sessions sit in an OrderedDict ordered by last activity: expiry pops from the
front, one timer is armed for the oldest session, and a full table evicts the
least recently used one. Datagrams up to 64 KiB pass whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import OrderedDict

from uproxy.relay.base import NoEndpointsError, Picker
from uproxy.stats import PortStats

log = logging.getLogger("uproxy.relay")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python 3.11 has no constant
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
MAX_DATAGRAM = 65536  # more than any UDP payload (65,507 over IPv4, 65,527 over IPv6)
ANC_SIZE = socket.CMSG_SPACE(20)  # fits in_pktinfo (12) and in6_pktinfo (20)
BATCH = 64  # datagrams per readiness callback before others get a turn
DRAIN_IDLE = 1.0  # after stop_accepting, a session idle this long is done
SOCKET_BUFFER = 1024 * 1024  # a few whole 64 KiB datagrams fit

SessionKey = tuple[str, int, str]


class _Session:
    __slots__ = ("client", "cmsg", "fd", "key", "last", "server", "sock")

    def __init__(self, server: UdpServer, key: SessionKey, client: tuple[object, ...],
                 sock: socket.socket, cmsg: list[tuple[int, int, bytes]], now: float) -> None:
        self.server = server
        self.key = key
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.cmsg = cmsg  # ancillary data that sets the reply's source address
        self.last = now

    def on_readable(self) -> None:
        """Replies from the endpoint: send each back to the client."""
        server = self.server
        stats = server.stats
        listener = server.sock
        if listener is None:
            return
        sock = self.sock
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP unreachable from the endpoint, reported late
                break
            try:
                if self.cmsg:
                    listener.sendmsg([data], self.cmsg, 0, self.client)
                else:
                    listener.sendto(data, self.client)
            except OSError:
                stats.udp_datagrams_dropped += 1
                continue
            stats.udp_datagrams_out += 1
        server.touch(self)


class UdpServer:
    """Serves one bound UDP socket for one service port."""

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
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: OrderedDict[SessionKey, _Session] = OrderedDict()
        self.draining = False
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle: asyncio.Future[None] | None = None

    def start(self) -> None:
        sock = self.sock
        assert sock is not None, "UDP server already closed"
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        if self.wildcard:
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._on_readable)
        self._reading = True

    def stop_accepting(self) -> None:
        """Stop reading new datagrams; open sessions may still get replies.

        Sessions then end after DRAIN_IDLE of idleness (or the session timeout,
        if shorter); `drain` waits for that and `abort` ends them at once. The
        listening socket is closed when the last session ends.
        """
        if self._reading and self.loop is not None:
            self.loop.remove_reader(self.fd)
            self._reading = False
        self.draining = True
        if not self.sessions:
            self._close_listener()
        else:
            self._arm()

    async def drain(self, timeout: float) -> None:
        if self.sessions:
            loop = asyncio.get_running_loop()
            if self._idle is None or self._idle.done():
                self._idle = loop.create_future()
            await asyncio.wait({self._idle}, timeout=timeout)
        if self.draining:
            self.abort()

    def abort(self) -> None:
        while self.sessions:
            _, session = self.sessions.popitem(last=False)
            self._end(session)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.draining = True
        if self._reading and self.loop is not None:
            self.loop.remove_reader(self.fd)
            self._reading = False
        self._close_listener()

    @property
    def open_sessions(self) -> int:
        return len(self.sessions)

    # -- datagrams from clients -------------------------------------------------

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        local_ip = self.local_ip
        for _ in range(BATCH):
            try:
                if self.wildcard:
                    data, ancdata, _flags, addr = sock.recvmsg(MAX_DATAGRAM, ANC_SIZE)
                    local_ip = self._destination(ancdata)
                else:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: recv failed: %s", self.name, exc)
                return
            self._datagram(data, addr, local_ip)

    def _destination(self, ancdata: list[tuple[int, int, bytes]]) -> str:
        for level, kind, payload in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(payload) >= 12:
                return socket.inet_ntop(socket.AF_INET, payload[8:12])  # ipi_addr
            if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(payload) >= 16:
                return socket.inet_ntop(socket.AF_INET6, payload[:16])  # ipi6_addr
        return self.local_ip

    def _datagram(self, data: bytes, addr: tuple[object, ...], local_ip: str) -> None:
        stats = self.stats
        key: SessionKey = (str(addr[0]), int(addr[1]), local_ip)  # type: ignore[call-overload]
        session = self.sessions.get(key)
        if session is None:
            session = self._open(key, addr, local_ip)
            if session is None:
                stats.udp_datagrams_dropped += 1
                return
        try:
            session.sock.send(data)
        except OSError:
            # EAGAIN (buffer full) or a late ICMP error: UDP may drop.
            stats.udp_datagrams_dropped += 1
        else:
            stats.udp_datagrams_in += 1
        self.touch(session)

    def _open(self, key: SessionKey, addr: tuple[object, ...], local_ip: str) -> _Session | None:
        assert self.loop is not None
        stats = self.stats
        try:
            endpoint = self.picker.pick(key[0])
        except NoEndpointsError:
            stats.no_endpoints += 1
            return None
        if len(self.sessions) >= self.max_sessions:
            _, oldest = self.sessions.popitem(last=False)
            self._end(oldest)
            stats.udp_sessions_expired += 1
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("%s: cannot open a session for %s: %s", self.name, key[0], exc)
            return None
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.connect((endpoint.ip, endpoint.port))
        except OSError as exc:
            sock.close()
            log.warning("%s: cannot reach %s: %s", self.name, endpoint, exc)
            return None
        session = _Session(self, key, addr, sock, self._reply_cmsg(local_ip), self.loop.time())
        self.sessions[key] = session
        self.loop.add_reader(session.fd, session.on_readable)
        stats.udp_sessions_created += 1
        stats.udp_sessions_active += 1
        self._arm()
        return session

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

    def touch(self, session: _Session) -> None:
        assert self.loop is not None
        session.last = self.loop.time()
        if session.key in self.sessions:
            self.sessions.move_to_end(session.key)

    def _timeout(self) -> float:
        return min(self.session_timeout, DRAIN_IDLE) if self.draining else self.session_timeout

    def _arm(self) -> None:
        """Keep one timer armed for when the least recently used session expires."""
        if not self.sessions or self.loop is None:
            return
        oldest = next(iter(self.sessions.values()))
        when = oldest.last + self._timeout()
        if self._timer is not None:
            if self._timer_at <= when:
                return  # fires first; it re-arms
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        assert self.loop is not None
        self._timer = None
        deadline = self.loop.time() - self._timeout()
        sessions = self.sessions
        while sessions:
            key, session = next(iter(sessions.items()))
            if session.last > deadline:
                break
            del sessions[key]
            self._end(session)
            self.stats.udp_sessions_expired += 1
        if sessions:
            self._arm()
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
        if self.sock is not None:
            self.sock.close()
            self.sock = None
