"""PROXY protocol to endpoints, end to end in laptop mode: a service with
`proxyProtocol: v1|v2` sends the header before any client byte, in every relay
mode and with workers; the endpoint learns the client's address and the
address the client dialled. An unknown value and UDP ports get one warning."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.apphelpers import running_uproxy, write_services
from uproxy.proxyheader import proxy_header


class Capture(asyncio.Protocol):
    """An endpoint that answers with everything it got before the client's `!`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"!"):
            self.transport.write(self.data)
            self.transport.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Capture, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def exchange(address: tuple[str, int], client_ip: str) -> tuple[bytes, tuple[str, int]]:
    reader, writer = await asyncio.open_connection(*address, local_addr=(client_ip, 0))
    try:
        source = writer.get_extra_info("sockname")[:2]
        writer.write(b"hello!")
        return await asyncio.wait_for(reader.read(), 10), source
    finally:
        writer.close()


@pytest.mark.parametrize(("version", "relay", "workers"), [
    ("v1", "auto", "1"), ("v2", "auto", "1"), ("v2", "splice", "1"), ("v1", "protocol", "1"),
    ("v2", "auto", "2"), ("v1", "sockmap", "1"),
])
async def test_the_endpoint_gets_the_header_first(
    tmp_path: Path, endpoint: int, version: str, relay: str, workers: str
) -> None:
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "web", "proxyProtocol": version,
                               "ports": [{"port": 8080}], "endpoints": [f"127.0.0.1:{endpoint}"]}])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16", "--relay", relay,
                              "--workers", workers) as up:
        address = up.address("default/web")
        got, source = await exchange(address, "127.0.0.9")
    expected = proxy_header(int(version[1]), source, address)
    assert got == expected + b"hello!"


async def test_unknown_values_and_udp_ports_are_said_once_and_get_no_header(
    tmp_path: Path, endpoint: int, caplog: pytest.LogCaptureFixture
) -> None:
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": "odd", "proxyProtocol": "v3", "ports": [{"port": 8080}],
         "endpoints": [f"127.0.0.1:{endpoint}"]},
        {"name": "dns", "proxyProtocol": "v1", "ports": [
            {"name": "udp", "port": 53, "protocol": "UDP"}, {"name": "tcp", "port": 53}],
         "endpoints": ["127.0.0.1"]},
    ])
    caplog.set_level(logging.WARNING, logger="uproxy.proxier")
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16") as up:
        got, _ = await exchange(up.address("default/odd"), "127.0.0.9")
        assert got == b"hello!"  # no header
        await up.reload()  # a reload with the same file says nothing again
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "default/dns: uproxy/proxy-protocol v1 is for TCP; UDP port udp gets no PROXY header",
        "default/odd: uproxy/proxy-protocol 'v3' is not v1 or v2; no PROXY header is sent",
    ]
