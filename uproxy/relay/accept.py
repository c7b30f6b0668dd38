"""An accept loop on a raw listening socket that never dies.

Modelled on trio's `_highlevel_serve_listeners.py`: accept in batches from a
readable callback; when the process or the system is out of descriptors
(EMFILE/ENFILE) or memory, stop watching the listener, count and log it once,
and try again after a pause that doubles from 100 ms up to 1 s. Errors a
connection brings with it (ECONNABORTED, a pending network error) only skip
that connection. Pending clients wait in the kernel's accept queue meanwhile.

The callback gets the bare descriptor (the C-level `_accept`): wrapping it in
a Python `socket.socket` costs an `__init__` in Python per connection, and the
relay makes the object it needs itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import cast

from uproxy.stats import PortStats

log = logging.getLogger("uproxy.relay")

# Out of a resource: accepting again at once would fail again.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Linux's accept(2) reports a pending error of the new connection; skip it.
CONNECTION_ERRNOS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
    errno.ECONNRESET, errno.ETIMEDOUT,
})

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0
ACCEPT_BATCH = 64

Accepted = Callable[[int, tuple[object, ...]], None]
_RawAccept = Callable[[], tuple[int, tuple[object, ...]]]


class AcceptLoop:
    __slots__ = (
        "_accept", "_backoff", "_fd", "_handle", "_logged", "_loop", "_on_accepted", "_sock",
        "batch", "name", "stats",
    )

    def __init__(self, sock: socket.socket, on_accepted: Accepted, stats: PortStats,
                 name: str = "", batch: int = ACCEPT_BATCH) -> None:
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        # accept4(2) without building a socket object; typeshed does not list it.
        self._accept = cast(_RawAccept, sock._accept)  # type: ignore[attr-defined]
        self._on_accepted = on_accepted
        self.stats = stats
        self.name = name
        self.batch = batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._backoff = BACKOFF_FIRST
        self._logged = False

    def start(self) -> None:
        assert self._sock is not None, "accept loop already stopped"
        if self._sock.gettimeout() != 0.0:  # listeners open non-blocking: no fcntl pair
            self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    def stop(self) -> None:
        """Stop accepting and close the listener: new connections are refused."""
        if self._sock is None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._sock.close()
        self._sock = None

    @property
    def stopped(self) -> bool:
        return self._sock is None

    def _on_readable(self) -> None:
        if self._sock is None:
            return
        accept = self._accept
        on_accepted = self._on_accepted
        for _ in range(self.batch):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in CONNECTION_ERRNOS:
                    continue
                self.pause(exc)
                return
            if self._logged:
                self._logged = False
                self._backoff = BACKOFF_FIRST
                log.info("%s: accepting again", self.name)
            on_accepted(fd, addr)
            if self._sock is None or self._handle is not None:
                return  # the callback stopped or paused us

    def pause(self, exc: OSError) -> None:
        """Stop accepting for a while: `exc` said a resource ran out.

        Also called by a connection that could not get a descriptor to dial.
        """
        if self._loop is None or self._sock is None or self._handle is not None:
            return
        self.stats.accept_backoffs += 1
        if not self._logged:
            self._logged = True
            kind = "resource" if exc.errno in RESOURCE_ERRNOS else "unexpected"
            log.warning("%s: accept paused (%s error: %s); retrying with backoff up to %.1fs",
                        self.name, kind, exc.strerror or exc, BACKOFF_MAX)
        self._loop.remove_reader(self._fd)
        self._handle = self._loop.call_later(self._backoff, self._resume)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        self._handle = None
        if self._sock is None or self._loop is None:
            return
        self._loop.add_reader(self._fd, self._on_readable)
