"""Pipes for splice(2): bytes go socket -> pipe -> socket without entering Python.

A pipe is two descriptors and a kernel buffer; making one per direction for
every short connection would cost more than the copy it saves, so idle pipes
wait in a bounded pool and are handed to connections that turned bulk. A pipe
goes back to the pool only when it is empty (no bytes of an old connection can
leak into a new one); otherwise it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

F_SETPIPE_SZ = 1031  # Linux fcntl; Python 3.11's fcntl module has no constant
F_GETPIPE_SZ = 1032
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Measured on loopback (tests/integration/relay_bench.py): with 256 KiB a bulk
# stream costs ~20% less proxy CPU per GiB than with the 64 KiB default; 1 MiB
# was no better and pins four times the memory per direction.
PIPE_SIZE = 256 * 1024


class Pipe:
    """One pipe: read end, write end, and the capacity it was given."""

    __slots__ = ("read_fd", "size", "write_fd")

    def __init__(self, read_fd: int, write_fd: int, size: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.size = size

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.read_fd = self.write_fd = -1


def make_pipe(size: int = PIPE_SIZE) -> Pipe:
    """A non-blocking pipe, enlarged to `size` when the kernel allows.

    Raises OSError (EMFILE/ENFILE) when out of descriptors. An unprivileged
    process over `pipe-user-pages-soft` cannot enlarge pipes (EPERM); it then
    keeps the size the kernel gave it.
    """
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        actual = fcntl.fcntl(write_fd, F_SETPIPE_SZ, size)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            os.close(read_fd)
            os.close(write_fd)
            raise
        actual = fcntl.fcntl(write_fd, F_GETPIPE_SZ)
    return Pipe(read_fd, write_fd, actual)


class PipePool:
    """Idle empty pipes, at most `max_idle` of them."""

    __slots__ = ("_idle", "max_idle", "size")

    def __init__(self, size: int = PIPE_SIZE, max_idle: int = 128) -> None:
        self.size = size
        self.max_idle = max_idle
        self._idle: list[Pipe] = []

    def get(self) -> Pipe:
        """An empty pipe; raises OSError when none can be made."""
        if self._idle:
            return self._idle.pop()
        return make_pipe(self.size)

    def put(self, pipe: Pipe, empty: bool) -> None:
        """Take a pipe back; `empty` says no bytes are left in it."""
        if empty and len(self._idle) < self.max_idle and pipe.read_fd >= 0:
            self._idle.append(pipe)
        else:
            pipe.close()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def clear(self) -> None:
        while self._idle:
            self._idle.pop().close()


# One pool per process: connections of every listener share it (the event loop
# is single-threaded, so no lock).
POOL = PipePool()
