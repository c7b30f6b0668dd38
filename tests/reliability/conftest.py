"""What the reliability tests share: the real `uproxy` command in laptop mode,
its resident memory and descriptors read from /proc, and loopback backends.

Every test here is bounded in time and talks only to loopback addresses (and
to namespaces it makes itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.apphelpers import Lines

BIND_RANGE = "127.78.0.0/16"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(check: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def pattern(size: int, seed: int = 7) -> bytes:
    """`size` bytes that are not all alike, so reordering or loss changes the digest."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def write_services(path: Path, services: list[dict[str, object]]) -> None:
    """Replace the file atomically (write aside, rename), as careful editors do."""
    aside = path.with_suffix(".tmp")
    aside.write_text(json.dumps({"services": services}))
    aside.replace(path)


@dataclass
class Uproxy:
    """A running `uproxy` process and what it printed."""

    process: subprocess.Popen[str]
    output: Lines
    services: Path
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def address(self, service: str, count: int = 1) -> tuple[str, int]:
        ip, port, _ = self.output.table(count)[service]
        return ip, port

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def fds(self) -> int:
        return open_fds(self.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # Started with -X faulthandler: SIGABRT writes every thread's
                # stack to stderr, so a hang says where it is.
                self.process.send_signal(signal.SIGABRT)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
        return self.process.wait()


@contextlib.contextmanager
def running_uproxy(services: Path, *flags: str, count: int = 1) -> Iterator[Uproxy]:
    process = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "uproxy", "--services", str(services),
         "--bind-range", BIND_RANGE,
         "--healthz-bind-address", "", "--metrics-bind-address", "", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    up = Uproxy(process, Lines(process), services)
    assert process.stderr is not None
    stderr = process.stderr
    reader = threading.Thread(target=lambda: up.stderr_lines.extend(iter(stderr.readline, "")),
                              daemon=True)
    reader.start()
    try:
        table = up.output.table(count, timeout=20)
        assert len(table) >= count, (up.output.lines, up.stderr_lines)
        yield up
    finally:
        code = up.stop()
        reader.join(5)
        # A hang's stacks (faulthandler, above) follow the last log lines.
        assert code == 0, "".join(up.stderr_lines[-60:])


class Backend:
    """A TCP server on 127.0.0.1 running `handle(conn)` per connection on a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made: list[Backend] = []
    yield made
    for backend in made:
        backend.close()
