"""`uproxy demo`: a cluster-in-a-box on loopback.

Starts small backends on 127.0.0.1 (two HTTP servers behind one service, a
TCP echo, a UDP echo), writes a services file for them from the bundled
example, and runs uproxy on it in laptop mode, printing what to try.
Everything stays on loopback; Ctrl-C stops it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import tempfile
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEMO_DEFAULTS = [
    "--bind-range", "127.77.0.0/16",
    "--healthz-bind-address", "127.0.0.1:10256",
    "--metrics-bind-address", "127.0.0.1:10249",
]


class _Http(asyncio.Protocol):
    """Answers every request with a short page naming this backend."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and self.transport is not None:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            body = f"hello from {self.label}\n".encode()
            close = b"connection: close" in head.lower()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n" + body
            )
            if close:
                self.transport.close()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def start_backends() -> tuple[dict[str, list[str]], list[Any]]:
    """Start the backends; return service name -> endpoints, and the servers."""
    loop = asyncio.get_running_loop()
    closers: list[Any] = []
    endpoints: dict[str, list[str]] = {"web": [], "echo": [], "dns": []}
    for label in ("web-1", "web-2"):
        server = await loop.create_server(functools.partial(_Http, label), "127.0.0.1", 0)
        closers.append(server)
        endpoints["web"].append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    closers.append(echo)
    endpoints["echo"].append(f"127.0.0.1:{echo.sockets[0].getsockname()[1]}")
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    closers.append(transport)
    endpoints["dns"].append(f"127.0.0.1:{transport.get_extra_info('sockname')[1]}")
    return endpoints, closers


def example_services() -> dict[str, Any]:
    text = resources.files("uproxy").joinpath("data/example-services.yaml").read_text()
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def write_services_file(folder: Path, endpoints: dict[str, list[str]]) -> Path:
    document = example_services()
    for service in document["services"]:
        service["endpoints"] = endpoints.get(service["name"], service.get("endpoints", []))
    path = folder / "services.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def hints(table: str) -> str:
    lines = ["", "try:"]
    for row in table.splitlines():
        parts = row.split()
        if len(parts) < 4 or "->" not in parts:
            continue
        name, port_proto, address = parts[0], parts[1], parts[parts.index("->") + 1]
        host, _, port = address.rpartition(":")
        if name.endswith("/web"):
            lines.append(f"  curl http://{address}/            # {name}: round-robin over 2 pods")
        elif port_proto.endswith("/udp"):
            lines.append(f"  echo hi | nc -u -w1 {host} {port}     # {name}: UDP echo")
        else:
            lines.append(f"  echo hi | nc -q1 {host} {port}        # {name}: TCP echo")
    lines.append("  open http://127.0.0.1:10249/status      # the live status page")
    lines.append("Ctrl-C stops the demo.\n")
    return "\n".join(lines)


async def _demo(argv: Sequence[str]) -> int:
    from uproxy import app
    from uproxy.cli import parse_settings

    endpoints, closers = await start_backends()
    with tempfile.TemporaryDirectory(prefix="uproxy-demo-") as folder:
        path = write_services_file(Path(folder), endpoints)
        settings, _ = parse_settings(["--services", str(path), *DEMO_DEFAULTS, *argv])
        printed = False

        def show(table: str) -> None:
            nonlocal printed
            app.print_table(table)
            if not printed:
                printed = True
                print(hints(table), flush=True)

        print(f"uproxy demo: backends on 127.0.0.1, services file {path}", flush=True)
        parts = app.build(settings, table_writer=show)
        try:
            await app.run(parts)
        finally:
            for closer in closers:
                closer.close()
    return 0


def demo_main(argv: Sequence[str]) -> int:
    from uproxy import app
    from uproxy.cli import UsageError
    from uproxy.logs import setup_logging

    setup_logging("text", 0)
    if os.environ.get("UPROXY_NO_UVLOOP") != "1":
        import uvloop

        uvloop.install()
    try:
        return asyncio.run(_demo(argv))
    except UsageError as error:
        print(f"uproxy demo: error: {error}", file=sys.stderr)
        return 2
    except app.StartupError as error:
        print(f"uproxy demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("stopped", file=sys.stderr)
        return 0
