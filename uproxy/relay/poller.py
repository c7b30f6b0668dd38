"""One edge-triggered epoll set per event loop for every relayed TCP socket,
and the dial deadlines (uproxy.relay.tcp's connections use both).

The loop watches only the poller's descriptor; each socket is added once
with IN|OUT|RDHUP|ET (or IN|RDHUP|ET) and leaves when its connection closes.
A connection whose handler raises (a bug) is failed, which closes and
unregisters it, and the traceback is logged: it is never left registered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
from collections import deque
from typing import Protocol

log = logging.getLogger("uproxy.relay")

TIMER_SLACK = 0.05  # dial timeouts fire up to this late, so one timer serves many dials

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
READABLE = EPOLLIN | EPOLLRDHUP | EPOLLHUP
WATCH = EPOLLIN | EPOLLOUT | EPOLLRDHUP | select.EPOLLET
# A connected socket is watched for EPOLLOUT only once a send to it blocked:
# adding it would report "writable" at once, and FIN/ACK changes would report
# it again, each a wasted turn on the fast path. Only a dial in progress
# watches EPOLLOUT from the start.
WATCH_READ = EPOLLIN | EPOLLRDHUP | select.EPOLLET

# A connection's states.
DIALLING, OPEN, CLOSED = 0, 1, 2


class Watched(Protocol):
    """A connection whose sockets the poller watches (relay.tcp's _Conn)."""

    state: int
    attempt: int

    def on_event(self, fd: int, mask: int) -> None: ...
    def dial_timed_out(self) -> None: ...
    def fail(self, outcome: str) -> None: ...


class Again(Protocol):
    """A direction that stopped with work left (relay.tcp's _Pump)."""

    @property
    def conn(self) -> Watched: ...
    def run(self) -> None: ...


def _bug(conn: Watched) -> None:
    log.exception("relay: a connection's handler failed; closing it")
    conn.fail("error")


class Poller:
    """One edge-triggered epoll set per event loop for every relayed socket.

    Also keeps the dial deadlines: one deque per timeout value (deadlines in
    each are in order), one loop timer for the earliest; a connection that
    connected in time is skipped when its entry comes up.
    """

    __slots__ = (
        "again", "again_armed", "conns", "deadlines", "epoll", "fd", "loop", "pid", "timer",
        "timer_at", "users",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.epoll = select.epoll()
        self.fd = self.epoll.fileno()
        # The connection of each watched descriptor, indexed by descriptor:
        # descriptors are small and dense, and a list costs 8 bytes a slot
        # where a dict cost ~30 per entry (S5: 20k descriptors at 10k
        # connections, 160 KB against 576 KB).
        self.conns: list[Watched | None] = []
        self.again: list[Again] = []
        self.again_armed = False
        self.deadlines: dict[float, deque[tuple[float, Watched, int]]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.users = 0  # servers started on this loop and not yet stopped and idle
        loop.add_reader(self.fd, self._on_ready)

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            if _POLLERS.get(id(self.loop)) is self:
                del _POLLERS[id(self.loop)]
            self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadlines.clear()
        self.again.clear()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
        self.epoll.close()

    def watch(self, fd: int, conn: Watched, events: int = WATCH) -> None:
        conns = self.conns
        if fd >= len(conns):
            conns.extend([None] * max(fd + 1 - len(conns), len(conns)))
        conns[fd] = conn
        self.epoll.register(fd, events)

    def forget(self, fd: int) -> Watched | None:
        """Stop routing `fd`'s events (the caller closes or unregisters it);
        the connection that was watching it, or None."""
        conns = self.conns
        if 0 <= fd < len(conns):
            conn, conns[fd] = conns[fd], None
            return conn
        return None

    def _on_ready(self) -> None:
        conns = self.conns
        size = len(conns)
        for fd, mask in self.epoll.poll(0):
            conn = conns[fd] if fd < size else None
            if conn is not None:
                try:
                    conn.on_event(fd, mask)
                except Exception:
                    _bug(conn)

    def later(self, pump: Again) -> None:
        """Run `pump` again soon: it stopped after ROUNDS with work left."""
        self.again.append(pump)
        if not self.again_armed:
            self.again_armed = True
            self.loop.call_soon(self._run_again)

    def _run_again(self) -> None:
        self.again_armed = False
        pumps, self.again = self.again, []
        for pump in pumps:
            if pump.conn.state == OPEN:
                try:
                    pump.run()
                except Exception:
                    _bug(pump.conn)

    def dial_deadline(self, conn: Watched, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        queue = self.deadlines.get(timeout)
        if queue is None:
            queue = self.deadlines[timeout] = deque()
        queue.append((deadline, conn, conn.attempt))
        if self.timer is None:
            self._arm(deadline)
        elif deadline < self.timer_at:  # a shorter timeout than the armed one
            self.timer.cancel()
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        delay = max(deadline - time.monotonic(), 0.0) + TIMER_SLACK
        self.timer_at = deadline
        self.timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = time.monotonic()
        earliest = None
        for timeout, queue in list(self.deadlines.items()):
            while queue and queue[0][0] <= now:
                _, conn, attempt = queue.popleft()
                if conn.state == DIALLING and conn.attempt == attempt:
                    try:
                        conn.dial_timed_out()
                    except Exception:
                        _bug(conn)
            if not queue:
                del self.deadlines[timeout]
            elif earliest is None or queue[0][0] < earliest:
                earliest = queue[0][0]
        if earliest is not None and self.timer is None:
            self._arm(earliest)


_POLLERS: dict[int, Poller] = {}
_pid = os.getpid()  # this process's (getpid is a syscall); a forked child sets its own


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def poller_for(loop: asyncio.AbstractEventLoop) -> Poller:
    """The running loop's poller; pollers of closed (or pre-fork) loops are dropped."""
    poller = _POLLERS.get(id(loop))
    if poller is not None and poller.loop is loop and poller.pid == _pid:
        return poller  # every listener of a sync asks: 10k at once
    pid = os.getpid()
    for key, old in list(_POLLERS.items()):
        if old.loop.is_closed() or old.pid != pid:
            del _POLLERS[key]
            if old.pid == pid:
                old.close()
    poller = _POLLERS.get(id(loop))
    if poller is None or poller.loop is not loop:
        poller = _POLLERS[id(loop)] = Poller(loop)
    return poller
