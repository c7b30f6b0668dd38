"""UDP relay over real loopback sockets: clients, the UdpServer, echo endpoints."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import pytest

from tests.integration.relay_helpers import (
    LOOP_POLICY_WARNING,
    FixedPicker,
    endpoint_of,
    event_loop_policy,  # noqa: F401 (a fixture: both loops for every test)
    udp_socket,
)
from uproxy.model import Endpoint
from uproxy.relay.udp import UdpServer
from uproxy.stats import PortStats

pytestmark = LOOP_POLICY_WARNING
BIG = 65507  # the largest UDP payload over IPv4



class UdpEcho:
    """An endpoint that sends every datagram back, prefixed with a tag."""

    def __init__(self, host: str = "127.0.0.1", tag: bytes = b"") -> None:
        self.sock = udp_socket(host)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.tag = tag
        self.peers: list[tuple[object, ...]] = []
        self.received: list[bytes] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)

    @property
    def endpoint(self) -> Endpoint:
        return endpoint_of(self.sock)

    def _on_readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            self.peers.append(addr)
            self.received.append(data)
            self.sock.sendto(self.tag + data, addr)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def dual_stack_listener() -> tuple[socket.socket, int]:
    """A wildcard IPv6 datagram socket that IPv4 clients reach too, and its port."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))
    return listener, listener.getsockname()[1]


def client_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = udp_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return sock


async def receive(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, tuple[object, ...]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            data, addr = sock.recvfrom(65536)
            return data, addr
        except BlockingIOError:
            await asyncio.sleep(0.005)
    raise TimeoutError("no datagram")


async def nothing_arrives(sock: socket.socket, wait: float = 0.2) -> bool:
    try:
        await receive(sock, wait)
    except TimeoutError:
        return True
    return False


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., tuple[UdpServer, PortStats, int]]]:
    servers: list[UdpServer] = []

    def make(picker: FixedPicker, host: str = "127.0.0.1",
             **kwargs: object) -> tuple[UdpServer, PortStats, int]:
        sock = udp_socket(host)
        stats = PortStats()
        server = UdpServer(sock, picker, stats, **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server, stats, sock.getsockname()[1]

    yield make
    for server in servers:
        server.abort()


async def test_echo_through_one_session(make_server: Callable[..., tuple[UdpServer, PortStats,
                                                                          int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint))
    client = client_socket()

    for word in (b"one", b"two", b"three"):
        client.sendto(word, ("127.0.0.1", port))
        data, addr = await receive(client)
        assert data == word
        assert addr == ("127.0.0.1", port)

    assert server.open_connections == 1
    assert len(set(echo.peers)) == 1  # one connected socket per client
    assert (stats.udp_datagrams_in, stats.udp_datagrams_out) == (3, 3)
    assert (stats.udp_sessions_created, stats.udp_sessions_active) == (1, 1)
    client.close()
    echo.close()


async def test_64k_datagram_passes_whole(make_server: Callable[..., tuple[UdpServer, PortStats,
                                                                           int]]) -> None:
    echo = UdpEcho()
    _, stats, port = make_server(FixedPicker(echo.endpoint))
    client = client_socket()
    payload = bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256)

    client.sendto(payload, ("127.0.0.1", port))
    data, _ = await receive(client)

    assert len(data) == BIG
    assert data == payload
    assert stats.udp_datagrams_dropped == 0
    client.close()
    echo.close()


async def test_ipv6_echo(make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho("::1")
    _, _, port = make_server(FixedPicker(echo.endpoint), host="::1")
    client = client_socket("::1")

    client.sendto(b"six", ("::1", port))
    data, addr = await receive(client)

    assert data == b"six"
    assert addr[:2] == ("::1", port)
    client.close()
    echo.close()


async def test_idle_session_expires(make_server: Callable[..., tuple[UdpServer, PortStats,
                                                                      int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint), session_timeout=0.3)
    client = client_socket()
    client.sendto(b"a", ("127.0.0.1", port))
    await receive(client)
    assert server.open_connections == 1

    await asyncio.sleep(0.8)
    assert server.open_connections == 0
    assert (stats.udp_sessions_expired, stats.udp_sessions_active) == (1, 0)

    client.sendto(b"b", ("127.0.0.1", port))  # a new session
    assert (await receive(client))[0] == b"b"
    assert stats.udp_sessions_created == 2
    client.close()
    echo.close()


async def test_activity_keeps_a_session(make_server: Callable[..., tuple[UdpServer, PortStats,
                                                                          int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint), session_timeout=0.5)
    client = client_socket()
    for _ in range(8):  # 0.8 s of traffic, never idle for 0.5 s
        client.sendto(b"k", ("127.0.0.1", port))
        await receive(client)
        await asyncio.sleep(0.1)
    assert stats.udp_sessions_created == 1
    assert server.open_connections == 1
    client.close()
    echo.close()


async def test_reply_leaves_from_the_address_the_client_used(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    _, _, port = make_server(FixedPicker(echo.endpoint), host="0.0.0.0")
    client = client_socket()

    for target in ("127.0.0.2", "127.0.0.1", "127.0.0.3"):
        client.sendto(target.encode(), (target, port))
        data, addr = await receive(client)
        assert data == target.encode()
        assert addr == (target, port)
    client.close()
    echo.close()


async def test_reply_source_on_a_wildcard_ipv6_listener(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho("::1")
    _, _, port = make_server(FixedPicker(echo.endpoint), host="::")
    client = client_socket("::1")

    client.sendto(b"v6", ("::1", port))
    data, addr = await receive(client)

    assert data == b"v6"
    assert addr[:2] == ("::1", port)
    client.close()
    echo.close()


async def test_no_endpoints_drops_and_counts(make_server: Callable[..., tuple[UdpServer,
                                                                             PortStats, int]]
                                             ) -> None:
    server, stats, port = make_server(FixedPicker())
    client = client_socket()

    client.sendto(b"lost", ("127.0.0.1", port))
    client.sendto(b"lost", ("127.0.0.1", port))

    assert await nothing_arrives(client)
    assert stats.udp_datagrams_dropped == 2
    assert stats.no_endpoints == 2
    assert server.open_connections == 0
    client.close()


async def test_full_table_evicts_the_least_recently_used(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint), max_sessions=2)
    clients = [client_socket() for _ in range(3)]

    for client in clients:
        client.sendto(b"hi", ("127.0.0.1", port))
        await receive(client)
        await asyncio.sleep(0.01)

    assert server.open_connections == 2
    assert stats.udp_sessions_created == 3
    assert stats.udp_sessions_expired == 1
    # The newest client still has its session; the oldest one's next datagram opens one.
    clients[2].sendto(b"hi", ("127.0.0.1", port))
    await receive(clients[2])
    assert stats.udp_sessions_created == 3
    clients[0].sendto(b"hi", ("127.0.0.1", port))
    await receive(clients[0])
    assert stats.udp_sessions_created == 4
    for client in clients:
        client.close()
    echo.close()


async def test_sessions_go_to_different_endpoints(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    first, second = UdpEcho(tag=b"1:"), UdpEcho(tag=b"2:")
    _, _, port = make_server(FixedPicker(first.endpoint, second.endpoint))
    clients = [client_socket() for _ in range(2)]

    replies = set()
    for client in clients:
        client.sendto(b"x", ("127.0.0.1", port))
        replies.add((await receive(client))[0])

    assert replies == {b"1:x", b"2:x"}
    for client in clients:
        client.close()
    first.close()
    second.close()


async def test_drain_lets_replies_through_then_closes(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint), session_timeout=30)
    client = client_socket()
    client.sendto(b"a", ("127.0.0.1", port))
    await receive(client)

    server.stop_accepting()
    client.sendto(b"ignored", ("127.0.0.1", port))
    started = time.monotonic()
    await server.drain(5.0)

    assert time.monotonic() - started < 2.0  # idle sessions end quickly when draining
    assert server.open_connections == 0
    assert stats.udp_datagrams_in == 1
    assert server.sock is None
    client.close()
    echo.close()


async def test_dual_stack_wildcard_listener_replies_to_ipv4_clients(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    listener, port = dual_stack_listener()
    server = UdpServer(listener, FixedPicker(echo.endpoint), PortStats())
    server.start()
    client = client_socket()

    for target in ("127.0.0.2", "127.0.0.1"):
        client.sendto(b"mapped", (target, port))
        data, addr = await receive(client)
        assert data == b"mapped"
        assert addr == (target, port)
    server.abort()
    client.close()
    echo.close()


def burst_payloads(client: int, count: int) -> list[bytes]:
    """Varied sizes (a 0-byte datagram, 1 byte, up to 1,400), each one unique."""
    sizes = [0, 1, 1400, *((i * 97 + client * 31) % 1400 + 1 for i in range(count - 3))]
    return [(f"{client}:{i}:".encode() * 300)[:size] if size >= 12 else bytes([i % 256]) * size
            for i, size in enumerate(sizes)]


async def receive_all(sock: socket.socket, count: int,
                      timeout: float = 5.0) -> list[tuple[bytes, tuple[object, ...]]]:
    got = []
    for _ in range(count):
        got.append(await receive(sock, timeout))
    return got


@pytest.mark.parametrize(("listen", "targets"), [
    ("127.0.0.1", ["127.0.0.1"]),
    ("0.0.0.0", ["127.0.0.2", "127.0.0.1", "127.0.0.3"]),
    ("::1", ["::1"]),
    ("::", ["::1"]),
])
async def test_a_burst_arrives_whole_in_order_from_the_address_used_with_exact_counts(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]],
        listen: str, targets: list[str]) -> None:
    family_host = "::1" if ":" in listen else "127.0.0.1"
    echo = UdpEcho(family_host)
    server, stats, port = make_server(FixedPicker(echo.endpoint), host=listen)
    clients = [client_socket(family_host) for _ in targets]
    sent = {i: burst_payloads(i, 150) for i in range(len(clients))}

    # Every client fires its whole burst before anyone reads: the listener
    # and the sessions see many datagrams queued at once.
    for i, (client, target) in enumerate(zip(clients, targets, strict=True)):
        for payload in sent[i]:
            client.sendto(payload, (target, port))

    for i, (client, target) in enumerate(zip(clients, targets, strict=True)):
        got = await receive_all(client, len(sent[i]))
        assert [data for data, _ in got] == sent[i]  # whole, in order, 0-byte one included
        assert {addr[:2] for _, addr in got} == {(target, port)}
    total = sum(len(p) for payloads in sent.values() for p in payloads)
    count = sum(len(payloads) for payloads in sent.values())
    assert (stats.udp_datagrams_in, stats.udp_datagrams_out) == (count, count)
    assert (stats.bytes_in, stats.bytes_out) == (total, total)
    assert stats.udp_datagrams_dropped == 0
    assert server.open_connections == len(clients)
    for client in clients:
        client.close()
    echo.close()


async def test_a_burst_on_a_dual_stack_listener_keeps_each_address(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    listener, port = dual_stack_listener()
    stats = PortStats()
    server = UdpServer(listener, FixedPicker(echo.endpoint), stats)
    server.start()
    client = client_socket()
    targets = ["127.0.0.2", "127.0.0.1", "127.0.0.3"] * 40

    for i, target in enumerate(targets):  # one client, three service addresses, interleaved
        client.sendto(f"{i}".encode(), (target, port))
    got = await receive_all(client, len(targets))

    # Each address is its own session; replies keep their order per session.
    for target in set(targets):
        mine = [int(data) for data, addr in got if addr == (target, port)]
        assert mine == [i for i, t in enumerate(targets) if t == target]
    assert stats.udp_datagrams_out == len(targets)
    assert server.open_connections == 3
    server.abort()
    client.close()
    echo.close()


async def test_replies_queued_when_the_listener_stops_still_leave(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint))
    client = client_socket()
    for word in (b"a", b"b", b"c"):
        client.sendto(word, ("127.0.0.1", port))
    assert [d for d, _ in await receive_all(client, 3)] == [b"a", b"b", b"c"]

    server.stop_accepting()
    echo.sock.sendto(b"late", server.sessions[next(iter(server.sessions))].sock.getsockname())
    data, _ = await receive(client)
    assert data == b"late"  # a draining session still gets its replies
    assert stats.udp_datagrams_out == 4
    client.close()
    echo.close()


UDP_SEGMENT, SOL_UDP = 103, 17


@pytest.mark.parametrize("split", [False, True], ids=["gso", "one-by-one"])
async def test_a_run_of_equal_datagrams_reaches_the_endpoint_as_the_same_datagrams(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]], split: bool) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint), host="0.0.0.0")
    client = client_socket()
    client.sendto(b"open", ("127.0.0.1", port))
    await receive(client)
    if split:  # as after a route refused UDP_SEGMENT
        next(iter(server.sessions.values())).gso = False
    run = [bytes([i]) * 1000 for i in range(40)] + [b"short", b"", b"x" * 1000]

    for payload in run:  # queued together: one read, one run of 40 (+ the short one)
        client.sendto(payload, ("127.0.0.1", port))
    got = await receive_all(client, len(run))

    assert echo.received[1:] == run  # the endpoint saw the same datagrams, in order
    assert [data for data, _ in got] == run
    assert stats.udp_datagrams_in == stats.udp_datagrams_out == len(run) + 1
    assert stats.bytes_in == stats.bytes_out == sum(map(len, run)) + 4
    client.close()
    echo.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_a_client_sending_with_gso_is_relayed_datagram_by_datagram(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]], host: str) -> None:
    echo = UdpEcho()
    _, stats, port = make_server(FixedPicker(echo.endpoint), host=host)
    client = client_socket()
    segments = [bytes([65 + i]) * 1200 for i in range(20)] + [b"tail" * 100]

    # One buffer the kernel cuts into 21 datagrams; the listener asked for
    # UDP_GRO, so it may read them back as one.
    client.sendmsg([b"".join(segments)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1200))],
                   0, ("127.0.0.1", port))
    got = await receive_all(client, len(segments))

    assert echo.received == segments
    assert [data for data, _ in got] == segments
    assert {addr for _, addr in got} == {("127.0.0.1", port)}
    assert stats.udp_datagrams_in == stats.udp_datagrams_out == len(segments)
    assert stats.bytes_in == stats.bytes_out == sum(map(len, segments))
    client.close()
    echo.close()


UDP_GRO = 104


class Burster:
    """An endpoint that answers b"N" with N datagrams of 1,000 bytes and a
    100-byte tail, each numbered by its first byte."""

    def __init__(self) -> None:
        self.sock = udp_socket("127.0.0.1")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)

    @property
    def endpoint(self) -> Endpoint:
        return endpoint_of(self.sock)

    @staticmethod
    def burst(count: int, first: int = 0) -> list[bytes]:
        return [bytes([(first + i) % 256]) * 1000 for i in range(count)] + [b"t" * 100]

    def _on_readable(self) -> None:
        data, addr = self.sock.recvfrom(100)
        for payload in self.burst(int(data)):
            self.sock.sendto(payload, addr)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


async def receive_segments(sock: socket.socket, count: int,
                           timeout: float = 5.0) -> tuple[list[bytes], int]:
    """`count` datagrams read with UDP_GRO on: the datagrams, and how many of
    the reads held more than one (sent with UDP_SEGMENT and kept whole)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[bytes] = []
    coalesced = 0
    while len(got) < count and loop.time() < deadline:
        try:
            data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        size = next((int.from_bytes(value[:4], "little") for level, kind, value in ancillary
                     if (level, kind) == (SOL_UDP, UDP_GRO)), 0)
        if size and len(data) > size:
            coalesced += 1
            got += [data[start:start + size] for start in range(0, len(data), size)]
        else:
            got.append(data)
    return got, coalesced


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize("gso", [True, False], ids=["gso", "one-by-one"])
async def test_bursts_of_replies_go_back_batched_as_the_same_datagrams(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]], host: str,
        gso: bool) -> None:
    burster = Burster()
    server, stats, port = make_server(FixedPicker(burster.endpoint), host=host)
    client = client_socket()
    client.setsockopt(SOL_UDP, UDP_GRO, 1)

    # The first burst finds the session reading one reply at a time; its
    # probe finds the rest waiting, and the session reads in batches after.
    client.sendto(b"40", ("127.0.0.1", port))
    first, _ = await receive_segments(client, 41)
    assert first == Burster.burst(40)
    (session,) = server.sessions.values()
    assert session.batched
    session.reply_gso = gso  # False: as after a route refused UDP_SEGMENT

    client.sendto(b"60", ("127.0.0.1", port))
    second, coalesced = await receive_segments(client, 61)

    assert second == Burster.burst(60)  # the same datagrams, in order, the tail too
    if gso:
        assert coalesced >= 1  # sent with UDP_SEGMENT: the client's GRO kept runs whole
    else:
        assert coalesced == 0
    assert stats.udp_datagrams_out == 41 + 61
    assert stats.bytes_out == 40_000 + 60_000 + 200
    assert stats.udp_datagrams_dropped == 0
    client.close()
    burster.close()


async def test_request_and_response_stays_on_one_read_per_reply(
        make_server: Callable[..., tuple[UdpServer, PortStats, int]]) -> None:
    echo = UdpEcho()
    server, stats, port = make_server(FixedPicker(echo.endpoint))
    client = client_socket()
    for i in range(100):  # one datagram in flight: never two replies waiting
        client.sendto(b"%d" % i, ("127.0.0.1", port))
        data, _ = await receive(client)
        assert data == b"%d" % i
    (session,) = server.sessions.values()
    assert not session.batched
    assert session.reads == 100
    assert stats.udp_datagrams_out == 100
    client.close()
    echo.close()
