"""The demo's backends: small servers on 127.0.0.1 (two HTTP servers behind
one service, a TCP echo, a UDP echo) and a services file for them, written
from the bundled example. `uproxy demo` (uproxy.commands.demo) proxies them.
"""

from __future__ import annotations

import asyncio
import functools
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


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
