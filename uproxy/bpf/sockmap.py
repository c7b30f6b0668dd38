"""The sockmap verdict: the kernel moves a joined connection's bytes, with
a credit that keeps a slow receiver from filling kernel memory.

Design. Per process (each worker has its own), all keyed by a socket's
cookie (SO_COOKIE, a u64 that never repeats while the host is up):

- `members` (SOCKHASH) holds a socket under its own cookie while the kernel
  moves its incoming bytes; the verdict program is attached to this map;
- `peers` (SOCKHASH) holds, under a socket's cookie, the socket its bytes go
  to (the other side of the connection);
- `used` (HASH, u64): bytes the verdict redirected from a socket since it
  last joined `members` (only the program writes it while it is a member);
- `limits` (HASH, u64): how far `used` may go before userspace hears of it
  (only userspace writes it, so neither side loses the other's update);
- `notices` (RINGBUF) carries the cookie of a socket whose `used` just
  crossed its limit; the relay's event loop watches its descriptor.

The sk_skb verdict runs on every skb a member receives:

    r6 = r1                                ; the skb
    r0 = get_socket_cookie(r1)             ; helper 46
    *(u64 *)(r10 - 8) = r0
    r7 = *map_lookup_elem(limits, r10 - 8) ; helper 1 (none: redirect)
    r0 = map_lookup_elem(used, r10 - 8)    ; (none: redirect)
    r2 = *r0 ; r3 = r2 + skb->len ; *r0 = r3
    if r2 > r7 goto redirect               ; was over before: said so already
    if r3 <= r7 goto redirect              ; still under
    ringbuf_output(notices, r10 - 8, 8, 0) ; helper 130: just crossed
  redirect:
    return sk_redirect_hash(skb, peers, r10 - 8, 0)   ; helper 72, flags 0: egress

34 instructions (38 slots). Every skb is redirected; crossing the limit only
tells userspace. If the destination has been written all but half a credit
of what was redirected, the receiver keeps up and the limit moves one
credit (1 MiB) on. Else userspace takes the socket out of `members` (its
later bytes stay in its receive queue, in order, under TCP flow control),
waits until the kernel has written every byte it redirected (`used` says
how many; reading TCP_INFO first waits for a verdict still running on
another CPU), copies in userspace with the relay's backpressure, and, when a
turn ends with the source empty and the destination not full, puts the
socket back with fresh counts. So a slow receiver holds at most about a
credit plus the socket buffers. Taking a socket in or out of `members` never
reorders bytes: the peer's queue is FIFO and a socket outside `members`
keeps its bytes. (A first version returned SK_PASS when out of credit, to
wake userspace through EPOLLIN: passed skbs queue behind the bytes
redirected *to* that socket, and recv() reports EOF before they arrive:
bytes were lost at the end of a stream.)

Closing a socket removes it from both SOCKHASHes (the kernel unlinks closed
sockets); the relay deletes its `used` and `limits` entries.

Measured on kernel 6.18 (see DESIGN.md): bytes queued before a socket joins
stay in its receive queue until the next skb arrives, when the verdict runs
over the whole queue in order; setting SO_RCVLOWAT runs it at once
(`tcp_set_rcvlowat` calls the data-ready hook), so joining is: insert, then
SO_RCVLOWAT. A FIN that arrives alone is a zero-length skb: redirected, the
peer's sender fails it with EPIPE (SO_ERROR on the peer, EPOLLERR) after
every byte before it left; the relay ignores that error on a direction whose
source has seen EOF. Without the credit the kernel applies no backpressure
between the two sockets: a receiver that stops reading let 96 MiB queue in
kernel memory in 50 ms.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable

from uproxy.bpf import asm
from uproxy.bpf.ringbuf import RingBuffer
from uproxy.bpf.syscall import (
    ANY,
    MAP_TYPE_HASH,
    MAP_TYPE_SOCKHASH,
    PROG_TYPE_SK_SKB,
    SK_SKB_VERDICT,
    BpfError,
    map_create,
    map_delete,
    map_keys,
    map_lookup,
    map_update,
    prog_attach,
    prog_load,
)

MAP_LOOKUP_ELEM = 1
GET_SOCKET_COOKIE = 46
SK_REDIRECT_HASH = 72
RINGBUF_OUTPUT = 130
SO_COOKIE = 57  # asm-generic/socket.h; Python 3.11 has no constant
KEY_SIZE = 8
MAX_ENTRIES = 65536  # per map; the open-file limit stops far below
CREDIT = 1024 * 1024  # bytes a socket may move past what its receiver took

_U64 = struct.Struct("<Q")
_ZERO = _U64.pack(0)


def verdict_program(peers_fd: int, used_fd: int, limits_fd: int, notices_fd: int) -> bytes:
    """The program in the module's docstring, assembled."""
    return asm.assemble(
        asm.mov(asm.R6, asm.R1),
        asm.call(GET_SOCKET_COOKIE),
        asm.store(asm.DW, asm.R10, -8, asm.R0),
        asm.load_map_fd(asm.R1, limits_fd),
        asm.mov(asm.R2, asm.R10),
        asm.add_imm(asm.R2, -8),
        asm.call(MAP_LOOKUP_ELEM),
        asm.jump_if_imm(asm.JEQ, asm.R0, 0, 21),          # no limit -> redirect
        asm.load(asm.DW, asm.R7, asm.R0, 0),              # r7 = limit
        asm.load_map_fd(asm.R1, used_fd),
        asm.mov(asm.R2, asm.R10),
        asm.add_imm(asm.R2, -8),
        asm.call(MAP_LOOKUP_ELEM),
        asm.jump_if_imm(asm.JEQ, asm.R0, 0, 14),          # no count -> redirect
        asm.load(asm.W, asm.R1, asm.R6, 0),               # skb->len
        asm.load(asm.DW, asm.R2, asm.R0, 0),              # r2 = used
        asm.mov(asm.R3, asm.R2),
        asm.add(asm.R3, asm.R1),
        asm.store(asm.DW, asm.R0, 0, asm.R3),             # used += len
        asm.jump_if(asm.JGT, asm.R2, asm.R7, 8),          # over before -> redirect
        asm.jump_if(asm.JLE, asm.R3, asm.R7, 7),          # still under -> redirect
        asm.load_map_fd(asm.R1, notices_fd),              # just crossed: tell userspace
        asm.mov(asm.R2, asm.R10),
        asm.add_imm(asm.R2, -8),
        asm.mov_imm(asm.R3, KEY_SIZE),
        asm.mov_imm(asm.R4, 0),
        asm.call(RINGBUF_OUTPUT),
        # redirect:
        asm.mov(asm.R1, asm.R6),
        asm.load_map_fd(asm.R2, peers_fd),
        asm.mov(asm.R3, asm.R10),
        asm.add_imm(asm.R3, -8),
        asm.mov_imm(asm.R4, 0),
        asm.call(SK_REDIRECT_HASH),
        asm.exit_(),
    )


def cookie(sock: _socket.socket) -> bytes:
    """The socket's cookie as the maps' key (8 bytes, host order)."""
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, KEY_SIZE)


class SockMap:
    """The maps and the attached verdict of one process (close() frees them)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, credit: int = CREDIT) -> None:
        self.credit = credit
        fds: list[int] = []
        notices: RingBuffer | None = None
        try:
            self.members = _keep(fds, map_create(MAP_TYPE_SOCKHASH, KEY_SIZE, 4, max_entries,
                                                 "uproxy_members"))
            self.peers = _keep(fds, map_create(MAP_TYPE_SOCKHASH, KEY_SIZE, 4, max_entries,
                                               "uproxy_peers"))
            self.used = _keep(fds, map_create(MAP_TYPE_HASH, KEY_SIZE, 8, max_entries,
                                              "uproxy_used"))
            self.limits = _keep(fds, map_create(MAP_TYPE_HASH, KEY_SIZE, 8, max_entries,
                                                "uproxy_limits"))
            notices = RingBuffer(name="uproxy_notices")
            self.prog_fd = _keep(fds, prog_load(
                PROG_TYPE_SK_SKB,
                verdict_program(self.peers, self.used, self.limits, notices.fd),
                name="uproxy_verdict"))
            prog_attach(self.members, self.prog_fd, SK_SKB_VERDICT)
        except BaseException:
            if notices is not None:
                notices.close()
            for fd in fds:
                os.close(fd)
            raise
        self.notices = notices
        self.fds = fds
        self.pid = os.getpid()
        # Who hears that a socket crossed its limit: cookie -> (loop, callback).
        self.listeners: dict[bytes, tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def link(self, a: _socket.socket, b: _socket.socket) -> tuple[bytes, bytes]:
        """Make a and b each other's peers (their cookies, returned, are the
        keys); `resume` then hands each one's bytes to the kernel."""
        keys = cookie(a), cookie(b)
        map_update(self.peers, keys[0], struct.pack("I", b.fileno()), ANY)
        try:
            map_update(self.peers, keys[1], struct.pack("I", a.fileno()), ANY)
        except OSError:
            with contextlib.suppress(OSError):
                map_delete(self.peers, keys[0])
            raise
        return keys

    def resume(self, key: bytes, sock: _socket.socket) -> None:
        """The kernel moves `sock`'s bytes again, counting from zero, starting
        with what waits in its receive queue."""
        map_update(self.used, key, _ZERO, ANY)
        map_update(self.limits, key, _U64.pack(self.credit), ANY)
        map_update(self.members, key, struct.pack("I", sock.fileno()), ANY)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def redirected(self, key: bytes) -> int:
        """Bytes the verdict moved from this socket since it last joined."""
        raw = map_lookup(self.used, key, 8)
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def extend(self, key: bytes, used: int) -> bool:
        """Let the verdict move a credit past `used` before it tells again;
        False when it had already gone past the new limit (then it will not tell)."""
        limit = used + self.credit
        map_update(self.limits, key, _U64.pack(limit), ANY)
        return self.redirected(key) <= limit

    def pause(self, key: bytes, sock: _socket.socket) -> int:
        """The kernel stops moving this socket's bytes (they stay queued on it);
        returns how many it redirected since it last joined."""
        map_delete(self.members, key)
        # A verdict already running on another CPU holds the socket's lock:
        # taking it (TCP_INFO does) waits for that run to finish and count.
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        return self.redirected(key)

    def listen(self, key: bytes, callback: Callable[[], None]) -> None:
        """Call `callback` (on the running loop) when this socket crosses its limit."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(self.notices.fd)
            self.loop = loop
            loop.add_reader(self.notices.fd, self._on_notices)
        self.listeners[key] = (loop, callback)

    def _on_notices(self) -> None:
        for key in self.notices.read():
            found = self.listeners.get(key)
            if found is None:
                continue  # closed meanwhile
            loop, callback = found
            if loop is self.loop:
                callback()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(callback)

    def forget(self, keys: tuple[bytes, bytes]) -> None:
        """A joined connection closed: drop its counts (the kernel drops the rest)."""
        for key in keys:
            self.listeners.pop(key, None)
            for fd in (self.used, self.limits):
                with contextlib.suppress(OSError):
                    map_delete(fd, key)

    def keys(self) -> list[bytes]:
        """Every key left in any of the maps (none once every connection closed)."""
        return [key for fd in (self.members, self.peers, self.used, self.limits)
                for key in map_keys(fd, KEY_SIZE)]

    def close(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.notices.fd)
        self.notices.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _keep(fds: list[int], fd: int) -> int:
    fds.append(fd)
    return fd


_MAPS: dict[int, SockMap] = {}
_WHY_NOT: dict[int, str | None] = {}


def sockmap() -> SockMap | None:
    """This process's map (made on first use, also after a fork), or None
    when the kernel or our privileges do not allow one (`unavailable` says why)."""
    pid = os.getpid()
    found = _MAPS.get(pid)
    if found is None and pid not in _WHY_NOT:
        try:
            found = _MAPS[pid] = SockMap()
            _WHY_NOT[pid] = None
        except OSError as exc:
            _WHY_NOT[pid] = _reason(exc)
    return found


def unavailable() -> str | None:
    """Why this process cannot use sockmap, or None when it can."""
    sockmap()
    return _WHY_NOT.get(os.getpid())


_WARNED: set[int] = set()


def fell_back(logger: logging.Logger) -> bool:
    """True when --relay sockmap must run as auto here; the first time a
    process finds it so, `logger` says why (one warning, whoever asks: the
    startup check or a worker's server)."""
    why = unavailable()
    if why is None:
        return False
    pid = os.getpid()
    if pid not in _WARNED:
        _WARNED.add(pid)
        logger.warning("--relay sockmap is not available, relaying with auto instead: %s", why)
    return True


def _reason(exc: OSError) -> str:
    if exc.errno == 1:  # EPERM
        return "bpf(2) needs CAP_BPF and CAP_NET_ADMIN (run as root)"
    if isinstance(exc, BpfError) and exc.log:
        return f"the kernel refused the verdict program: {exc}"
    return f"bpf(2): {exc.strerror or exc}"
