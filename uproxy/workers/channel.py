"""Framed messages with descriptors over a Unix stream socket.

A frame is `!IH` (body length, descriptor count), then the body; its
descriptors ride on its first byte, which Linux delivers with the first read
that returns that byte. `FrameDecoder` is the sans-io part: bytes and
descriptors in, whole frames out. A frame whose body is not a message is an
error value (`BadFrame`), and the frames after it still decode; only a header
that cannot be a frame (longer than MAX_FRAME) ends the stream, since no
boundary after it can be trusted.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uproxy.workers.messages import Message, MessageError, decode, encode

log = logging.getLogger("uproxy.workers")

HEADER = struct.Struct("!IH")
MAX_FRAME = 64 * 1024 * 1024  # a stats report of 10k listeners is a few MiB
_READ_SIZE = 256 * 1024
_MAX_FDS = 16


@dataclass(frozen=True)
class Frame:
    message: Message
    fds: list[int]


@dataclass(frozen=True)
class BadFrame:
    """A frame that is not a message: its descriptors (to close) and why."""

    reason: str
    fds: list[int]


class StreamBroken(Exception):
    """The byte stream cannot be framed any more; `str()` says why."""


class FrameDecoder:
    """Bytes and received descriptors in, frames out (no I/O)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Frame | BadFrame]:
        """The frames completed by `data`; StreamBroken on an impossible header."""
        self._fds.extend(fds)
        self._buffer += data
        out: list[Frame | BadFrame] = []
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            length, count = HEADER.unpack_from(buffer, offset)
            if length > self.max_frame:
                raise StreamBroken(f"a frame of {length} bytes (at most {self.max_frame})")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            body = bytes(buffer[offset + HEADER.size:end])
            frame_fds = [self._fds.popleft() for _ in range(min(count, len(self._fds)))]
            offset = end
            try:
                out.append(Frame(decode(body), frame_fds))
            except MessageError as error:
                out.append(BadFrame(str(error), frame_fds))
        del buffer[:offset]
        return out

    def leftover_fds(self) -> list[int]:
        """Descriptors received for frames that never completed (to close)."""
        fds = list(self._fds)
        self._fds.clear()
        return fds


def frame(message: Message, fd_count: int = 0) -> bytes:
    body = encode(message)
    return HEADER.pack(len(body), fd_count) + body


class Channel:
    """A FrameDecoder and an output queue on a non-blocking Unix stream socket."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message, list[int]], None],
        on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._on_message = on_message
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self._decoder = FrameDecoder()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._closed = asyncio.Event()
        self._loop.add_reader(self._fd, self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if self.closed:
            return
        # Duplicates, so a listener closed before the frame leaves cannot
        # turn the number into someone else's descriptor.
        self._out.append((frame(message, len(fds)), [os.dup(fd) for fd in fds]))
        self._flushed.clear()
        if not self._writing:
            self._flush()

    @property
    def pending(self) -> int:
        return len(self._out)

    async def flushed(self, timeout: float) -> None:
        """Wait until every queued frame left (or the channel closed), at most `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), timeout)

    async def until_closed(self, timeout: float) -> None:
        """Wait for the peer's end of file (its last frames read), at most `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout)

    def close(self) -> None:
        if self.closed:
            return
        self._closed.set()
        self._flushed.set()
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._writing = False
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        for fd in self._decoder.leftover_fds():
            os.close(fd)
        self.sock.close()

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], rights)
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._fd, self._flush)
                return
            except OSError:
                self._lost()
                return
            for fd in fds:
                os.close(fd)
            if sent < len(data):
                self._out[0] = (data[sent:], [])
            else:
                self._out.popleft()
        self._flushed.set()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(_READ_SIZE, socket.CMSG_SPACE(_MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            received: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    numbers = array.array("i")
                    numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
                    received.extend(numbers)
            if not data:
                for fd in received:
                    os.close(fd)
                self._lost()
                return
            try:
                frames = self._decoder.feed(data, received)
            except StreamBroken as error:
                log.error("worker channel: %s; closing it", error)
                self._lost()
                return
            for item in frames:
                if isinstance(item, BadFrame):
                    log.error("worker channel: %s (skipped)", item.reason)
                    for fd in item.fds:
                        os.close(fd)
                    continue
                self._on_message(item.message, item.fds)
                if self.closed:
                    return

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self._on_closed()
