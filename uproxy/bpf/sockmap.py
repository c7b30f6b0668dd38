"""The sockmap verdict: the kernel moves a joined connection's bytes.

Design. One SOCKHASH per process (each worker has its own), keyed by a
socket's cookie (SO_COOKIE, a u64 that never repeats while the host is up),
whose value is the *peer* socket: the entry `cookie(client) -> endpoint
socket` puts the endpoint socket in the map, `cookie(endpoint) -> client`
the client. An sk_skb verdict program attached to the map runs on every skb a
member socket receives and redirects it to the egress of the socket stored
under its own cookie:

    r6 = r1                          ; the skb
    r0 = get_socket_cookie(r1)       ; helper 46
    *(u64 *)(r10 - 8) = r0
    r1 = r6
    r2 = map                         ; a 64-bit immediate: two slots
    r3 = r10 - 8
    r4 = 0                           ; flags 0: the peer's egress
    r0 = sk_redirect_hash(r1, r2, r3, r4)   ; helper 72
    exit

Ten instructions in eleven slots. Keying by cookie needs no address or port in the key, so IPv4,
IPv6 and v4-mapped connections are all the same; a key whose peer is gone
(one side already closed) makes the helper return SK_DROP, which only
happens while the connection is being torn down. Closing a socket removes
its entry (the kernel unlinks closed sockets from every sockmap), so there is
no delete on the hot path and nothing to leak.

Measured on kernel 6.18 (see DESIGN.md): bytes queued before a socket joins
stay in its receive queue until the next skb arrives, when the verdict runs
over the whole queue in order; setting SO_RCVLOWAT runs it at once
(`tcp_set_rcvlowat` calls the data-ready hook), so joining is: insert both
entries, then SO_RCVLOWAT on both sockets. A FIN that arrives alone is a
zero-length skb: redirected, the peer's sender fails it with EPIPE (SO_ERROR
on the peer, EPOLLERR) after every byte before it left; the relay ignores that
error on a direction whose source has seen EOF. The kernel applies no
backpressure between the two sockets: a receiver that stops reading lets the
other side's bytes queue in kernel memory (96 MiB in 50 ms here).
"""

from __future__ import annotations

import _socket
import contextlib
import os
import socket
import struct

from uproxy.bpf import asm
from uproxy.bpf.syscall import (
    ANY,
    MAP_TYPE_SOCKHASH,
    PROG_TYPE_SK_SKB,
    SK_SKB_VERDICT,
    BpfError,
    map_create,
    map_keys,
    map_update,
    prog_attach,
    prog_load,
)

GET_SOCKET_COOKIE = 46
SK_REDIRECT_HASH = 72
SO_COOKIE = 57  # asm-generic/socket.h; Python 3.11 has no constant
KEY_SIZE = 8
MAX_ENTRIES = 65536  # two per connection; the open-file limit stops far below


def verdict_program(map_fd: int) -> bytes:
    """The program in the module's docstring, assembled."""
    return asm.assemble(
        asm.mov(asm.R6, asm.R1),
        asm.call(GET_SOCKET_COOKIE),
        asm.store(asm.DW, asm.R10, -8, asm.R0),
        asm.mov(asm.R1, asm.R6),
        asm.load_map_fd(asm.R2, map_fd),
        asm.mov(asm.R3, asm.R10),
        asm.add_imm(asm.R3, -8),
        asm.mov_imm(asm.R4, 0),
        asm.call(SK_REDIRECT_HASH),
        asm.exit_(),
    )


def cookie(sock: _socket.socket) -> bytes:
    """The socket's cookie as the map's key (8 bytes, host order)."""
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, KEY_SIZE)


class SockMap:
    """One SOCKHASH with the verdict program attached (close() frees both)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.map_fd = map_create(MAP_TYPE_SOCKHASH, KEY_SIZE, 4, max_entries, "uproxy_peers")
        try:
            self.prog_fd = prog_load(PROG_TYPE_SK_SKB, verdict_program(self.map_fd),
                                     name="uproxy_verdict")
            try:
                prog_attach(self.map_fd, self.prog_fd, SK_SKB_VERDICT)
            except BaseException:
                os.close(self.prog_fd)
                raise
        except BaseException:
            os.close(self.map_fd)
            raise
        self.pid = os.getpid()

    def join(self, a: _socket.socket, b: _socket.socket) -> None:
        """From now on the kernel moves a's bytes to b and b's to a, starting
        with what already waits in their receive queues."""
        map_update(self.map_fd, cookie(a), struct.pack("I", b.fileno()), ANY)
        map_update(self.map_fd, cookie(b), struct.pack("I", a.fileno()), ANY)
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def keys(self) -> list[bytes]:
        return map_keys(self.map_fd, KEY_SIZE)

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


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


def _reason(exc: OSError) -> str:
    if exc.errno == 1:  # EPERM
        return "bpf(2) needs CAP_BPF and CAP_NET_ADMIN (run as root)"
    if isinstance(exc, BpfError) and exc.log:
        return f"the kernel refused the verdict program: {exc}"
    return f"bpf(2): {exc.strerror or exc}"
