"""TCP relay over real loopback sockets: a client, the TcpServer, a backend.

Each test reads as a timeline: a backend and a picker over it, a proxy in a
given mode, a client that does something, and what the client, the backend
and the counters saw.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.integration.relay_helpers import (
    LOOP_POLICY_WARNING,
    FixedPicker,
    backend,
    closed_port,
    echo,
    endpoint_of,
    event_loop_policy,  # noqa: F401 (a fixture: both loops for every test)
    tcp_listener,
)
from uproxy.balancer import Balancer
from uproxy.model import Endpoint, ServicePortName
from uproxy.relay import tcp as relay_tcp
from uproxy.relay.splice import Pipe, PipePool
from uproxy.relay.tcp import TcpServer
from uproxy.stats import PortStats

MODES = ["splice", "protocol", "auto", "sockmap"]  # sockmap runs as auto without root
pytestmark = LOOP_POLICY_WARNING
MiB = 1024 * 1024
PAYLOAD = bytes(range(256)) * (MiB // 256)



class Proxy:
    def __init__(self, server: TcpServer, stats: PortStats, port: int, host: str) -> None:
        self.server = server
        self.stats = stats
        self.port = port
        self.host = host

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def closed(self, timeout: float = 5.0) -> None:
        """Wait until the proxy has no open connection."""
        deadline = time.monotonic() + timeout
        while self.server.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert self.server.open_connections == 0


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Proxy]]:
    servers: list[TcpServer] = []

    def make(picker: FixedPicker, mode: str = "auto", host: str = "127.0.0.1",
             **kwargs: object) -> Proxy:
        sock = tcp_listener(host)
        port = sock.getsockname()[1]
        stats = PortStats()
        server = TcpServer(sock, picker, stats, mode=mode, **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return Proxy(server, stats, port, host)

    yield make
    for server in servers:
        server.stop_accepting()
        server.abort()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


async def connect_and_read(proxy: Proxy, timeout: float) -> bytes:
    """Connect and read to EOF; a reset may surface in either step."""
    reader, writer = await proxy.connect()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


@pytest.mark.parametrize("mode", MODES)
async def test_echo_counts_bytes_exactly(make_proxy: Callable[..., Proxy], mode: str) -> None:
    server, endpoint = await backend(echo)
    log: list[dict[str, object]] = []
    proxy = make_proxy(FixedPicker(endpoint), mode, access_log=log.append)

    reader, writer = await proxy.connect()
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    writer.write(b"world!")
    writer.write_eof()
    assert await read_all(reader) == b"world!"
    writer.close()
    await proxy.closed()

    assert proxy.stats.connections_accepted == 1
    assert proxy.stats.connections_active == 0
    assert (proxy.stats.bytes_in, proxy.stats.bytes_out) == (11, 11)
    assert len(proxy.stats.dial_latencies) == 1
    assert log[0]["outcome"] == "ok" and log[0]["bytes_in"] == 11
    server.close()


@pytest.mark.parametrize("mode", MODES)
async def test_client_half_closes_first_then_server_answers(
        make_proxy: Callable[..., Proxy], mode: str) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def read_then_answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until the client's FIN
        received.set_result(data)
        w.write(PAYLOAD[::-1])
        await w.drain()
        w.close()

    server, endpoint = await backend(read_then_answer)
    proxy = make_proxy(FixedPicker(endpoint), mode)

    reader, writer = await proxy.connect()
    writer.write(PAYLOAD)
    writer.write_eof()
    answer = await read_all(reader)

    assert await asyncio.wait_for(received, 5) == PAYLOAD
    assert answer == PAYLOAD[::-1]
    writer.close()
    await proxy.closed()
    assert (proxy.stats.bytes_in, proxy.stats.bytes_out) == (MiB, MiB)
    server.close()


@pytest.mark.parametrize("mode", MODES)
async def test_server_half_closes_first_then_client_answers(
        make_proxy: Callable[..., Proxy], mode: str) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def send_then_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(PAYLOAD)
        w.write_eof()
        received.set_result(await r.read())
        w.close()

    server, endpoint = await backend(send_then_read)
    proxy = make_proxy(FixedPicker(endpoint), mode)

    reader, writer = await proxy.connect()
    assert await read_all(reader) == PAYLOAD  # EOF arrived while our side is open
    writer.write(PAYLOAD[::-1])
    writer.write_eof()

    assert await asyncio.wait_for(received, 10) == PAYLOAD[::-1]
    writer.close()
    await proxy.closed()
    assert (proxy.stats.bytes_in, proxy.stats.bytes_out) == (MiB, MiB)
    server.close()


@pytest.mark.parametrize("mode", MODES)
async def test_server_speaks_first(make_proxy: Callable[..., Proxy], mode: str) -> None:
    async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 smtp ready\r\n")
        await w.drain()
        await r.read()
        w.close()

    server, endpoint = await backend(banner)
    proxy = make_proxy(FixedPicker(endpoint), mode)

    reader, writer = await proxy.connect()
    assert await asyncio.wait_for(reader.readline(), 5) == b"220 smtp ready\r\n"
    writer.close()
    await proxy.closed()
    server.close()


async def test_ipv6_listener_and_endpoint(make_proxy: Callable[..., Proxy]) -> None:
    server, endpoint = await backend(echo, "::1")
    proxy = make_proxy(FixedPicker(endpoint), "auto", host="::1")

    reader, writer = await proxy.connect()
    writer.write(b"six")
    writer.write_eof()
    assert await read_all(reader) == b"six"
    writer.close()
    await proxy.closed()
    server.close()


async def test_failover_when_first_endpoint_refuses(make_proxy: Callable[..., Proxy]) -> None:
    server, endpoint = await backend(echo)
    picker = FixedPicker(closed_port(), endpoint)
    proxy = make_proxy(picker, "auto")

    reader, writer = await proxy.connect()
    writer.write(b"ping")
    writer.write_eof()
    assert await read_all(reader) == b"ping"

    assert picker.calls == [("127.0.0.1", False), ("127.0.0.1", True)]
    assert proxy.stats.dial_attempts_failed == 1
    assert proxy.stats.connections_failed == 0
    writer.close()
    server.close()


async def test_failover_when_first_endpoint_does_not_answer(
        make_proxy: Callable[..., Proxy]) -> None:
    # A listener whose accept queue is full drops SYNs: the dial hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)
    await asyncio.sleep(0.05)
    server, endpoint = await backend(echo)
    picker = FixedPicker(endpoint_of(full), endpoint)
    proxy = make_proxy(picker, "auto", dial_timeouts=(0.2, 1.0))

    started = time.monotonic()
    reader, writer = await proxy.connect()
    writer.write(b"ping")
    writer.write_eof()
    assert await read_all(reader) == b"ping"
    elapsed = time.monotonic() - started

    assert elapsed >= 0.2  # the first attempt waited out its timeout
    assert proxy.stats.dial_attempts_failed == 1
    assert picker.calls[1] == ("127.0.0.1", True)
    writer.close()
    server.close()
    for filler in fillers:
        filler.close()
    full.close()


async def test_no_endpoints_resets_promptly(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(FixedPicker(), "auto")

    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        await connect_and_read(proxy, 1.0)

    assert time.monotonic() - started < 1.0
    assert proxy.stats.no_endpoints == 1
    assert proxy.stats.connections_active == 0


async def test_every_dial_failing_resets_and_counts(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(FixedPicker(closed_port(), closed_port()), "auto",
                       dial_timeouts=(0.1, 0.1, 0.1))

    with pytest.raises(ConnectionResetError):
        await connect_and_read(proxy, 2.0)

    assert proxy.stats.connections_failed == 1
    assert proxy.stats.dial_attempts_failed == 3


@pytest.mark.parametrize("mode", ["auto", "protocol", "sockmap"])
async def test_client_reset_reaches_the_backend(make_proxy: Callable[..., Proxy],
                                                mode: str) -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def wait_for_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            data = await r.read()
            outcome.set_result(f"eof after {len(data)}")
        except ConnectionResetError:
            outcome.set_result("reset")
        w.close()

    server, endpoint = await backend(wait_for_client)
    proxy = make_proxy(FixedPicker(endpoint), mode)

    client = socket.create_connection(("127.0.0.1", proxy.port))
    client.sendall(b"x")
    await asyncio.sleep(0.1)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    client.close()

    assert await asyncio.wait_for(outcome, 5) == "reset"
    await proxy.closed()
    server.close()


@pytest.mark.parametrize("mode", ["auto", "protocol", "sockmap"])
async def test_drain_waits_for_open_connection_and_abort_closes_it(
        make_proxy: Callable[..., Proxy], mode: str) -> None:
    server, endpoint = await backend(echo)
    proxy = make_proxy(FixedPicker(endpoint), mode)
    reader, writer = await proxy.connect()
    writer.write(b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"

    proxy.server.stop_accepting()
    with pytest.raises(ConnectionRefusedError):
        await proxy.connect()
    started = time.monotonic()
    await proxy.server.drain(0.3)
    assert time.monotonic() - started >= 0.29
    assert proxy.server.open_connections == 1

    proxy.server.abort()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2)
    assert proxy.server.open_connections == 0
    assert proxy.stats.bytes_in == 1
    writer.close()
    server.close()


async def test_drain_returns_once_the_last_connection_closes(
        make_proxy: Callable[..., Proxy]) -> None:
    server, endpoint = await backend(echo)
    proxy = make_proxy(FixedPicker(endpoint), "auto")
    reader, writer = await proxy.connect()
    writer.write(b"a")
    await asyncio.wait_for(reader.readexactly(1), 5)
    proxy.server.stop_accepting()

    async def close_soon() -> None:
        await asyncio.sleep(0.1)
        writer.write_eof()

    closer = asyncio.ensure_future(close_soon())
    started = time.monotonic()
    await proxy.server.drain(5.0)
    assert time.monotonic() - started < 2.0
    assert proxy.server.open_connections == 0
    await closer
    writer.close()
    server.close()


async def test_with_the_real_balancer(make_proxy: Callable[..., Proxy]) -> None:
    server_a, endpoint_a = await backend(echo)
    server_b, endpoint_b = await backend(echo)
    balancer = Balancer(shuffle=lambda endpoints: None)
    name = ServicePortName("default", "web", "http")
    balancer.update(name, [endpoint_a, endpoint_b], None)
    stats = PortStats()
    picker = balancer.picker(name, stats)
    proxy = make_proxy(picker, "auto")

    for _ in range(4):
        reader, writer = await proxy.connect()
        writer.write_eof()
        assert await read_all(reader) == b""
        writer.close()
    await proxy.closed()

    assert stats.picks == {str(endpoint_a): 2, str(endpoint_b): 2}
    assert sorted([endpoint_a, endpoint_b]) == [Endpoint(e.ip, e.port) for e in
                                                sorted([endpoint_a, endpoint_b])]
    server_a.close()
    server_b.close()


class CountingPipes(PipePool):
    """A pipe pool that records how many pipes connections took."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def get(self) -> Pipe:
        self.taken += 1
        return super().get()


async def test_auto_keeps_small_keepalive_traffic_on_copy(
        make_proxy: Callable[..., Proxy]) -> None:
    server, endpoint = await backend(echo)
    pipes = CountingPipes()
    proxy = make_proxy(FixedPicker(endpoint), "auto", pipes=pipes, promote_after=1000)

    reader, writer = await proxy.connect()
    for _ in range(50):  # 5,000 bytes each way, far past promote_after, in small turns
        writer.write(b"q" * 100)
        assert await asyncio.wait_for(reader.readexactly(100), 5) == b"q" * 100
    writer.write_eof()
    assert await read_all(reader) == b""
    writer.close()
    await proxy.closed()

    assert pipes.taken == 0
    assert (proxy.stats.bytes_in, proxy.stats.bytes_out) == (5000, 5000)
    pipes.clear()
    server.close()


async def test_auto_promotes_bulk_to_splice(make_proxy: Callable[..., Proxy]) -> None:
    server, endpoint = await backend(echo)
    pipes = CountingPipes()
    proxy = make_proxy(FixedPicker(endpoint), "auto", pipes=pipes, promote_after=64 * 1024)

    reader, writer = await proxy.connect()
    for _ in range(8):
        writer.write(PAYLOAD)
    writer.write_eof()
    received = await asyncio.wait_for(reader.readexactly(8 * MiB), 20)
    assert await read_all(reader) == b""
    writer.close()
    await proxy.closed()

    assert received == PAYLOAD * 8
    assert pipes.taken >= 1
    assert pipes.idle == pipes.taken  # every pipe came back empty
    assert (proxy.stats.bytes_in, proxy.stats.bytes_out) == (8 * MiB, 8 * MiB)
    pipes.clear()
    server.close()


@pytest.mark.parametrize("mode", MODES)
async def test_tasks_per_connection(make_proxy: Callable[..., Proxy], mode: str) -> None:
    loop = asyncio.get_running_loop()
    relay_tasks: list[str] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any,
                         **kwargs: Any) -> asyncio.Future[Any]:
        code = getattr(coro, "cr_code", None)
        if code is not None and "uproxy/relay" in code.co_filename:
            relay_tasks.append(code.co_name)
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    server, endpoint = await backend(echo)
    proxy = make_proxy(FixedPicker(endpoint), mode)
    loop.set_task_factory(counting_factory)
    try:
        for _ in range(5):
            reader, writer = await proxy.connect()
            writer.write(b"ping")
            writer.write_eof()
            assert await read_all(reader) == b"ping"
            writer.close()
        await proxy.closed()
    finally:
        loop.set_task_factory(default_factory)

    # The copying modes run from the poller; protocol mode makes its transports
    # in one ordinary task per connection, which ends once they exist.
    assert relay_tasks == (["_wrap"] * 5 if mode == "protocol" else [])
    assert proxy.stats.connections_accepted == 5
    server.close()


@pytest.mark.parametrize("mode", MODES)
async def test_dial_that_completes_after_connect_returns(
        make_proxy: Callable[..., Proxy], mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off loopback the handshake is not done when connect() returns: the
    relay waits for EPOLLOUT. Pretend that here, for a client that speaks
    first and an endpoint that speaks first."""
    monkeypatch.setattr(relay_tcp, "_established", lambda sock: False)

    async def banner_then_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello\n")
        await w.drain()
        await echo(r, w)

    server, endpoint = await backend(banner_then_echo)
    proxy = make_proxy(FixedPicker(endpoint), mode)

    reader, writer = await proxy.connect()
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"hello\nping"
    writer.write_eof()
    assert await read_all(reader) == b""
    writer.close()
    await proxy.closed()

    assert (proxy.stats.bytes_in, proxy.stats.bytes_out) == (4, 10)
    server.close()


async def test_a_connection_whose_handler_fails_is_closed_and_unregistered(
    make_proxy: Callable[..., Proxy], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a connection's event handler must not leave it registered
    (the drain would wait for it forever): it is reset and logged once."""
    server, endpoint = await backend(echo)
    proxy = make_proxy(FixedPicker(endpoint), "auto")
    reader, writer = await proxy.connect()
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    broken = [False]
    real = relay_tcp._Conn.on_event

    def on_event(conn: Any, fd: int, mask: int) -> None:
        if not broken[0]:
            broken[0] = True
            raise RuntimeError("a bug in the relay")
        real(conn, fd, mask)

    monkeypatch.setattr(relay_tcp._Conn, "on_event", on_event)
    writer.write(b"again")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(5), 5)
    await proxy.closed()
    assert broken[0]
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    writer.close()
    server.close()


@pytest.mark.parametrize("mode", ["splice", "auto"])
async def test_closed_connections_leave_nothing_in_the_poller(
    make_proxy: Callable[..., Proxy], mode: str
) -> None:
    """The poller routes events by descriptor: every slot a connection took is
    empty again once it closed, whichever side closed it."""
    server, endpoint = await backend(echo)
    proxy = make_proxy(FixedPicker(endpoint), mode)
    poller = relay_tcp.poller_for(asyncio.get_running_loop())
    clients = [await proxy.connect() for _ in range(20)]
    for reader, writer in clients:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
    routed = [conn for conn in poller.conns if conn is not None]
    assert len(routed) == 40  # a client and an endpoint socket each
    for index, (_, writer) in enumerate(clients):
        if index % 2:
            writer.close()  # a FIN from the client
        else:
            writer.transport.abort()  # a reset from the client
    await proxy.closed()
    assert [conn for conn in poller.conns if conn is not None] == []
    server.close()
