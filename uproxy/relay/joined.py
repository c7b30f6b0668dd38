"""A connection whose bytes the kernel moves (`--relay sockmap`), seen from
the relay: its two directions, their EOFs, and the credit that brings a
direction back to userspace when its receiver falls behind.

Each direction is in one of three phases:

- KERNEL: the source socket is in the sockmap's `members`; the verdict moves
  its bytes to the destination's egress. Its EOF is passed on (shutdown
  SHUT_WR on the destination) once TCP_INFO shows every byte the source
  received was written into the destination: no FIN overtakes redirected
  bytes. When the verdict has moved a credit's worth of bytes it says so
  through the ring buffer (see uproxy.bpf.sockmap): the direction is paused.
- DRAINING: paused (the source is out of `members`, its bytes wait in its
  receive queue under TCP flow control) until the destination has been
  written every byte the kernel redirected.
- COPYING: the direction's pump copies in userspace with the relay's usual
  backpressure; when a turn ends with the source empty and the destination
  not full, the source joins `members` again with fresh credit.

Waits for the kernel's queue are checked on a timer that backs off
(FLUSH_CHECKS); a connection with nothing to wait for has no timer.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import select
import socket
from typing import TYPE_CHECKING

from uproxy.bpf.sockmap import SockMap
from uproxy.relay.poller import (
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    OPEN,
    WATCH_READ,
)
from uproxy.relay.tcpinfo import received, written

if TYPE_CHECKING:
    from uproxy.relay.tcp import _Conn, _Pump

KERNEL, DRAINING, COPYING = 0, 1, 2
UP, DOWN = 1, 2  # bits: client -> endpoint, endpoint -> client
FLUSH_CHECKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_EPIPE = errno.EPIPE


class Joined:
    """The sockmap side of one connection (`_Conn.joined`)."""

    __slots__ = ("base", "checks", "conn", "ended", "eofs", "keys", "phase", "sockmap",
                 "target", "timer")

    def __init__(self, conn: _Conn, sockmap: SockMap) -> None:
        client, upstream = conn.client, conn.upstream
        assert upstream is not None
        self.conn = conn
        self.sockmap = sockmap
        # Per direction: what the destination had been written when the kernel
        # took over (a PROXY header, bytes copied before), and what it must
        # have been written before userspace may copy again.
        self.base = [0, 0, 0]
        self.target = [0, 0, 0]
        self.phase = [0, COPYING, COPYING]
        self.keys = sockmap.link(client, upstream)
        assert conn.up is not None and conn.down is not None
        conn.up.thorough = conn.down.thorough = True
        self.eofs = 0  # bit UP: the client's FIN arrived; DOWN: the endpoint's
        self.ended = 0  # bit UP: the client's EOF was passed on; DOWN: the endpoint's
        self.checks = 0
        self.timer: asyncio.TimerHandle | None = None
        for d in (UP, DOWN):
            sockmap.listen(self.keys[d - 1], functools.partial(self.out_of_credit, d))
            self._resume(d)

    def out_of_credit(self, d: int) -> None:
        """The kernel moved a credit past what direction d's receiver had taken
        when last asked: let it go on if the receiver keeps up, else pause."""
        if self.conn.state != OPEN or self.phase[d] != KERNEL:
            return
        sockmap, key = self.sockmap, self.keys[d - 1]
        dst = self._sides(d)[1]
        try:
            used = sockmap.redirected(key)
            behind = self.base[d] + used - written(dst)  # still in the kernel's queue
            if behind > sockmap.credit // 2 or not sockmap.extend(key, used):
                self._pause(d)
                self.tick()
        except OSError:
            self.conn.fail("reset")

    def _resume(self, d: int) -> None:
        """Hand direction d to the kernel, with fresh credit. A socket whose
        peer's FIN already came cannot join (the kernel takes only
        established sockets): that direction keeps copying to its end."""
        src, dst, pump, _ = self._sides(d)
        self.base[d] = written(dst)
        try:
            self.sockmap.resume(self.keys[d - 1], src)
        except OSError:
            return
        self.phase[d] = KERNEL
        pump.done = True  # a turn queued in poller.later does nothing
        pump.writable = True
        # The kernel writes to dst now: its EPOLLOUT edges (one per ACK that
        # frees space, in a bulk stream) would only wake us for nothing.
        conn = self.conn
        if dst is conn.client:
            if conn.client_out:
                conn.client_out = False
                conn.poller.epoll.modify(conn.cfd, WATCH_READ)
        elif conn.upstream_out:
            conn.upstream_out = False
            conn.poller.epoll.modify(conn.ufd, WATCH_READ)

    def _sides(self, d: int) -> tuple[_socket.socket, _socket.socket, _Pump, int]:
        """(source, destination, pump, extra bytes written) of direction d."""
        conn = self.conn
        upstream = conn.upstream
        assert upstream is not None and conn.up is not None and conn.down is not None
        if d == UP:
            header = len(conn.header) if conn.header is not None else 0
            return conn.client, upstream, conn.up, header
        return upstream, conn.client, conn.down, 0

    def on_event(self, fd: int, mask: int) -> None:
        conn = self.conn
        d = UP if fd == conn.cfd else DOWN  # the direction whose source this is
        other = UP + DOWN - d  # ... and whose destination
        src, _, pump, _ = self._sides(d)
        try:
            if mask & EPOLLERR:
                err = src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                # A FIN that came alone is a zero-length skb the kernel fails to
                # send to this socket with EPIPE, after every byte before it:
                # not an error once the other direction's source has the FIN.
                other_src = self._sides(other)[0]
                if err not in (0, _EPIPE) or not (self.eofs & other or _hung_up(other_src)):
                    conn.fail("reset")
                    return
                if not self.eofs & other:
                    self.eofs |= other
                    self.tick()
            if mask & EPOLLOUT and self.phase[other] == COPYING:
                other_pump = self._sides(other)[2]
                other_pump.writable = True
                self._run(other)
                if conn.state != OPEN:
                    return
            if mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
                if mask & (EPOLLRDHUP | EPOLLHUP):
                    self.eofs |= d
                phase = self.phase[d]
                if phase == KERNEL:
                    self.tick()
                else:
                    pump.readable = True
                    if mask & (EPOLLRDHUP | EPOLLHUP):
                        pump.rdhup = True
                    if phase == COPYING:
                        self._run(d)
        except OSError:
            conn.fail("reset")

    def _pause(self, d: int) -> None:
        """Out of credit: the kernel stops; wait for what it redirected to be written."""
        src, _, pump, _ = self._sides(d)
        self.target[d] = self.base[d] + self.sockmap.pause(self.keys[d - 1], src)
        self.phase[d] = DRAINING
        pump.readable = True
        pump.rdhup = bool(self.eofs & d)

    def _run(self, d: int) -> None:
        """A copying direction's turn; back to the kernel when it ends idle."""
        pump = self._sides(d)[2]
        pump.run()
        if (self.conn.state == OPEN and self.phase[d] == COPYING and not pump.readable
                and pump.pending is None and pump.writable and not pump.eof and not pump.done):
            self._resume(d)

    def tick(self) -> None:
        """Pass on EOFs and end drains whose bytes the kernel has all written."""
        self.timer = None
        conn = self.conn
        if conn.state != OPEN:
            return
        waiting = False
        for d in (UP, DOWN):
            src, dst, pump, extra = self._sides(d)
            phase = self.phase[d]
            if phase == KERNEL and self.eofs & d and not self.ended & d:
                if written(dst) < received(src, fin=True) + extra:
                    waiting = True
                    continue
                self.ended |= d
                if self.ended == UP | DOWN:
                    conn.close()
                    return
                dst.shutdown(socket.SHUT_WR)
            elif phase == DRAINING:
                if written(dst) < self.target[d]:
                    waiting = True
                    continue
                self.phase[d] = COPYING
                pump.done = False
                pump.thorough = True
                self._run(d)
                if conn.state != OPEN:
                    return
        if waiting:
            delay = FLUSH_CHECKS[min(self.checks, len(FLUSH_CHECKS) - 1)]
            self.checks += 1
            self.timer = conn.poller.loop.call_later(delay, self._tick_soon)
        else:
            self.checks = 0

    def _tick_soon(self) -> None:
        try:
            self.tick()
        except OSError:
            self.conn.fail("reset")

    def copied_to_end(self, pump: _Pump) -> None:
        """A copying direction read EOF and flushed: pass the FIN on."""
        conn = self.conn
        d = UP if pump is conn.up else DOWN
        self.eofs |= d  # recv said EOF, maybe before epoll said RDHUP
        self.ended |= d
        if self.ended == UP | DOWN:
            conn.close()
            return
        try:
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                conn.fail("reset")

    def end(self) -> tuple[int, int]:
        """The connection closes: bytes each way from the kernel's counts."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.sockmap.forget(self.keys)
        conn = self.conn
        upstream = conn.upstream
        assert upstream is not None
        return (received(conn.client, fin=bool(self.eofs & UP)),
                received(upstream, fin=bool(self.eofs & DOWN)))


def _hung_up(sock: _socket.socket) -> bool:
    """Whether the peer's FIN (or a reset) has arrived, asked directly."""
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLRDHUP)
    return bool(poll.poll(0))
