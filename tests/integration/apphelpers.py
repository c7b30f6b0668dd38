"""Helpers for tests that run a whole uproxy in-process on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import threading
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from uproxy import app
from uproxy.cli import parse_settings
from uproxy.rules.base import Rules
from uproxy.sources.base import Source, SourceSink
from uproxy.sources.file import FileSource


class TaggedServer(asyncio.Protocol):
    """A TCP backend that answers each chunk with `tag:` + the chunk."""

    def __init__(self, tag: str) -> None:
        self.tag = tag.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.tag + b":" + data)


class TaggedUdp(asyncio.DatagramProtocol):
    def __init__(self, tag: str) -> None:
        self.tag = tag.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.tag + b":" + data, addr)


class Backends:
    """Tagged TCP/UDP backends on 127.0.0.1; closed by the fixture."""

    def __init__(self) -> None:
        self.closers: list[Any] = []

    async def tcp(self, tag: str, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: TaggedServer(tag), host, 0)
        self.closers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def udp(self, tag: str, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: TaggedUdp(tag), local_addr=(host, 0)
        )
        self.closers.append(transport)
        port: int = transport.get_extra_info("sockname")[1]
        return port

    def close(self) -> None:
        for closer in self.closers:
            closer.close()


def write_services(path: Path, services: list[dict[str, Any]]) -> None:
    """Write atomically so the file source never reads half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump({"services": services}, sort_keys=False))
    temporary.replace(path)


class Running:
    def __init__(self, parts: app.Parts, task: asyncio.Task[None], tables: list[str]) -> None:
        self.parts = parts
        self.task = task
        self.tables = tables

    def address(self, service: str, port_name: str = "", protocol: str = "TCP") -> tuple[str, int]:
        for name, listener in self.parts.pool.listeners.items():
            if (str(name.service), name.port, name.protocol) == (service, port_name, protocol):
                return listener.ip, listener.port
        raise KeyError(f"{service}:{port_name}/{protocol} has no listener")

    async def wait_for(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s; table:\n"
                                     + (self.tables[-1] if self.tables else "(none)"))
            await asyncio.sleep(0.02)

    async def reload(self) -> None:
        """Make the file source read the file now and wait for the sync it causes."""
        syncs = self.parts.runner.syncs
        source = self.parts.source
        assert isinstance(source, FileSource)
        source.reload()
        parts = self.parts
        await self.wait_for(lambda: parts.runner.syncs > syncs and not parts.tracker.pending
                            and not parts.runner.pending)


@contextlib.asynccontextmanager
async def running(source: Source, sink: SourceSink) -> AsyncIterator[asyncio.Task[None]]:
    """A source reporting to `sink` until the block ends."""
    task = asyncio.create_task(source.run(sink))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running_uproxy(
    services_file: Path | None, *flags: str, rules: Rules | None = None,
    source: Source | None = None, start_timeout: float = 5.0,
) -> AsyncIterator[Running]:
    """A whole uproxy on the loop; from the services file, or from `source`."""
    where = ["--services", str(services_file)] if services_file is not None else []
    settings, _ = parse_settings([
        *where, "--min-sync-period", "0s", "--sync-period", "5s",
        "--healthz-bind-address", "", "--metrics-bind-address", "", *flags,
    ])
    tables: list[str] = []
    if source is None:
        assert services_file is not None
        source = FileSource(services_file, debounce=0.05, poll_interval=0.1)
    parts = app.build(settings, source=source, rules=rules, table_writer=tables.append)
    task = asyncio.create_task(app.run(parts))
    running = Running(parts, task, tables)
    try:
        await running.wait_for(lambda: parts.runner.syncs >= 1 or task.done(),
                               timeout=start_timeout)
        if task.done():
            task.result()
        yield running
    finally:
        parts.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


async def tcp_exchange(address: tuple[str, int], payload: bytes = b"ping",
                       timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout)
    try:
        writer.write(payload)
        await writer.drain()
        data = b""
        while not data.endswith(payload):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def udp_exchange(address: tuple[str, int], payload: bytes = b"ping",
                       timeout: float = 3.0) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, payload)
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        return data, sock.getpeername()
    finally:
        sock.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.05)


TABLE_LINE = re.compile(r"^(\S+)\s+(\d+)/(tcp|udp)\s+->\s+(\S+):(\d+)\s+\((\d+) endpoints?\)$")


class Lines:
    """Collects a process's stdout lines on a thread, so tests can wait for them."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        stream = process.stdout
        self._thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")),
                                        daemon=True)
        self._thread.start()

    def table(self, services: int, timeout: float = 10) -> dict[str, tuple[str, int, int]]:
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for line in list(self.lines):
                match = TABLE_LINE.match(line.strip())
                if match:
                    found[match[1]] = (match[4], int(match[5]), int(match[6]))
            if len(found) >= services or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
