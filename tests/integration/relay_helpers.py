"""Shared pieces of the relay tests: a fixed-endpoint picker, listeners, backends."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from uproxy.model import Endpoint
from uproxy.picking import NoEndpointsError, TrafficSplit

# Relay modules run every test on both loops: `from relay_helpers import event_loop_policy`.
LOOP_POLICY_WARNING = pytest.mark.filterwarnings(
    "ignore:.*event_loop_policy.*:DeprecationWarning")


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """uvloop is what runs in production; the stdlib loop must work too."""
    if request.param == "uvloop":
        policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
        return policy
    return asyncio.DefaultEventLoopPolicy()


class FixedPicker:
    """Round-robin over a fixed list; records every pick."""

    def __init__(self, *endpoints: Endpoint) -> None:
        self.endpoints = list(endpoints)
        self.index = 0
        self.calls: list[tuple[str, bool]] = []
        self.split = TrafficSplit()  # never active: no traffic is external here

    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        self.calls.append((client_ip, reset_affinity))
        if not self.endpoints:
            raise NoEndpointsError("no endpoints")
        endpoint = self.endpoints[self.index % len(self.endpoints)]
        self.index += 1
        return endpoint

    pick_external = pick


def tcp_listener(host: str = "127.0.0.1", backlog: int = 512) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def udp_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)


def closed_port(host: str = "127.0.0.1") -> Endpoint:
    """A port nothing listens on (connect is refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return Endpoint(host, port)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
    except ConnectionError:
        writer.close()


async def backend(handler: Handler, host: str = "127.0.0.1") -> tuple[asyncio.Server, Endpoint]:
    server = await asyncio.start_server(handler, host, 0)
    sockname = server.sockets[0].getsockname()
    return server, Endpoint(sockname[0], sockname[1])
