"""Laptop mode through the API server's port-forward (`--dial portforward`),
against the test API server and its kubelet: pods sit at addresses nothing
routes to (198.18.50.x); the kubelet reaches their ports on loopback
addresses the test chose. Timelines: round-robin over pods, affinity,
failover past a pod whose forward fails, a rollout, the API server dropping
streams, 4 MiB each way, half-close with v5 and v4, 403 and 404, UDP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.apphelpers import Running, running_uproxy
from tests.kubeapi import FakeKubeAPI, endpoint_slice, pod, pod_endpoint, service
from uproxy.portforward import connection
from uproxy.proxyheader import proxy_header
from uproxy.sources.kube import KubeSource

LAPTOP = ("--bind-range", "127.77.0.0/16", "--dial", "portforward")
PORT = 7300  # every pod's port: each pod's kubelet target is its own loopback address


class PodServer(asyncio.Protocol):
    """What a pod runs: answers `NAME:` + what it got; on EOF says `NAME:bye` and closes."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.name + b":" + data)

    def eof_received(self) -> bool:
        self.transport.write(self.name + b":bye")
        self.transport.close()
        return True


class Cluster:
    """The test API server, pods with servers on loopback, one service over them."""

    def __init__(self, api: FakeKubeAPI) -> None:
        self.api = api
        self.servers: list[asyncio.Server] = []
        self.hosts: dict[str, str] = {}

    def ip_of(self, name: str) -> str:
        return f"198.18.50.{list(self.hosts).index(name) + 1}"

    async def add_pod(self, name: str, *, serving: bool = True) -> str:
        host = f"127.0.0.{20 + len(self.hosts)}"
        self.hosts[name] = host
        ip = self.ip_of(name)
        self.api.create(pod("default", name, ip))
        self.api.kubelet.targets[f"default/{name}"] = host
        if serving:
            loop = asyncio.get_running_loop()
            self.servers.append(await loop.create_server(
                lambda: PodServer(name), host, PORT, reuse_address=True))
        return ip

    def publish(self, service_name: str, pods: list[str], *,
                annotations: dict[str, str] | None = None, **spec: Any) -> None:
        """The service and one slice naming these pods (created or replaced)."""
        svc = service("default", service_name, ports=[{"name": "p", "port": 80}], **spec)
        svc["metadata"]["annotations"] = dict(annotations or {})
        slice_ = endpoint_slice(
            "default", f"{service_name}-x", service_name, ports=[{"name": "p", "port": PORT}],
            endpoints=[pod_endpoint("default", name, self.ip_of(name)) for name in pods])
        for obj in (svc, slice_):
            self.api.apply(obj)

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    api = FakeKubeAPI(bookmark_interval=1.0)
    await api.start()
    made = Cluster(api)
    yield made
    made.close()
    await api.stop()


@contextlib.asynccontextmanager
async def uproxy(cluster: Cluster, *flags: str) -> AsyncIterator[Running]:
    source = KubeSource(master=cluster.api.url, watch_timeout=5, backoff_initial=0.1,
                        backoff_cap=0.5)
    async with running_uproxy(None, *LAPTOP, *flags, source=source) as up:
        await up.wait_for(lambda: bool(up.parts.pool.listeners) or bool(up.parts.pool.errors))
        yield up


async def ask(address: tuple[str, int], payload: bytes = b"hi", *, half_close: bool = False,
              timeout: float = 10) -> bytes:
    """Send, then read until EOF (after a half-close) or the first answer."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(payload)
        if half_close:
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


async def test_connections_round_robin_over_pods_through_port_forward(cluster: Cluster) -> None:
    for name in ("web-1", "web-2"):
        await cluster.add_pod(name)
    cluster.publish("web", ["web-1", "web-2"])
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        answers = [await ask(address, b"x", half_close=True) for _ in range(4)]
        assert sorted(answers) == [b"web-1:xweb-1:bye"] * 2 + [b"web-2:xweb-2:bye"] * 2
        assert answers[0] != answers[1] and answers[:2] == answers[2:]  # round-robin
        assert sorted(p for p, _, _ in cluster.api.kubelet.sessions) == [
            "default/web-1", "default/web-1", "default/web-2", "default/web-2"]
        await up.wait_for(lambda: up.parts.proxier.portforward_streams == 0)
        (name,) = up.parts.pool.listeners
        stats = up.parts.pool.stats[name]
        assert stats.connections_accepted == 4 and stats.dial_attempts_failed == 0
        assert stats.bytes_in == 4 and stats.bytes_out == 4 * len(b"web-1:xweb-1:bye")


async def test_client_ip_affinity_keeps_one_pod(cluster: Cluster) -> None:
    for name in ("web-1", "web-2"):
        await cluster.add_pod(name)
    cluster.publish("web", ["web-1", "web-2"], sessionAffinity="ClientIP")
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        answers = {await ask(address, b"x") for _ in range(5)}
        assert len(answers) == 1


async def test_a_pod_whose_forward_fails_is_passed_over_and_counted(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.add_pod("down", serving=False)  # the kubelet's connect is refused
    await cluster.add_pod("web-1")
    cluster.publish("web", ["down", "web-1"])
    caplog.set_level(logging.WARNING, logger="uproxy.portforward")
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        answers = [await ask(address, b"x") for _ in range(4)]
        assert answers == [b"web-1:x"] * 4  # every connection served
        (name,) = up.parts.pool.listeners
        stats = up.parts.pool.stats[name]
        # Every pick of "down" failed over (a failover moves the round-robin on,
        # so it is picked first again: three or four times, by the shuffle).
        assert stats.dial_attempts_failed == stats.picks["198.18.50.1:7300"] >= 3
        assert stats.connections_failed == 0
    lines = [r.getMessage() for r in caplog.records if "pod default/down" in r.getMessage()]
    assert lines and "connection refused" in lines[0]
    assert len(lines) == 1  # the same pod and reason: said once


async def test_a_rollout_moves_new_connections_and_lets_old_ones_finish(
    cluster: Cluster
) -> None:
    await cluster.add_pod("web-1")
    await cluster.add_pod("web-2")
    cluster.publish("web", ["web-1"])
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"old")
        assert await reader.read(100) == b"web-1:old"

        cluster.publish("web", ["web-2"])  # web-1 replaced
        await up.wait_for(lambda: any(e.pod == "default/web-2" for p in
                                      up.parts.proxier.applied.values() for e in p.endpoints))
        assert await ask(address, b"new") == b"web-2:new"
        writer.write(b"still")  # the open connection keeps its pod
        assert await reader.read(100) == b"web-1:still"
        writer.close()


async def test_the_api_server_dropping_streams_ends_them_and_serving_goes_on(
    cluster: Cluster
) -> None:
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"])
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"a")
        assert await reader.read(100) == b"web-1:a"
        await cluster.api.kubelet.drop_streams()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(100), 5) == b""  # EOF, or a reset
        writer.close()
        assert await ask(address, b"b") == b"web-1:b"
        await up.wait_for(lambda: up.parts.proxier.portforward_streams == 0)


async def test_four_mebibytes_each_way_arrive_intact(cluster: Cluster) -> None:
    await cluster.add_pod("echo", serving=False)
    loop = asyncio.get_running_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

        def eof_received(self) -> bool:
            self.transport.close()
            return True

    cluster.servers.append(await loop.create_server(Echo, cluster.hosts["echo"], PORT,
                                                    reuse_address=True))
    cluster.publish("echo", ["echo"])
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    async with uproxy(cluster) as up:
        reader, writer = await asyncio.open_connection(*up.address("default/echo", "p"))

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await asyncio.wait_for(reader.read(), 30)  # to EOF (v5 half-close)
        await sender
        writer.close()
        assert received == payload


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
async def test_half_close(cluster: Cluster, protocol: str,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """v5 passes the client's EOF on: the pod answers `bye` and closes. v4
    cannot: the stream ends once the pod has been quiet for V4_LINGER."""
    monkeypatch.setattr(connection, "V4_LINGER", 0.5)
    cluster.api.kubelet.protocols = (protocol,)
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"])
    async with uproxy(cluster) as up:
        answer = await ask(up.address("default/web", "p"), b"x", half_close=True)
    if protocol.startswith("v5"):
        assert answer == b"web-1:xweb-1:bye"
    else:
        assert answer == b"web-1:x"


async def test_403_is_one_line_naming_the_rbac_permission(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"])
    cluster.api.kubelet.forbidden = True
    caplog.set_level(logging.WARNING, logger="uproxy.portforward")
    async with uproxy(cluster) as up:
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            assert await ask(up.address("default/web", "p")) == b""
            raise ConnectionResetError
        (name,) = up.parts.pool.listeners
        stats = up.parts.pool.stats[name]
        # Refused for every pod alike: one attempt, no failover through the others.
        assert (stats.connections_failed, stats.dial_attempts_failed) == (1, 1)
    forbidden = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
    assert len(forbidden) == 1
    assert "needs the RBAC permission pods/portforward, verbs get and create" in forbidden[0]


async def test_a_pod_that_is_gone_is_404_and_the_next_one_serves(cluster: Cluster) -> None:
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"])
    cluster.hosts["ghost"] = "127.0.0.99"  # named by the slice, never created
    cluster.publish("web", ["ghost", "web-1"])
    async with uproxy(cluster) as up:
        answers = [await ask(up.address("default/web", "p"), b"x") for _ in range(2)]
        assert answers == [b"web-1:x"] * 2
        (name,) = up.parts.pool.listeners
        stats = up.parts.pool.stats[name]
        # Every pick of the ghost failed over (once or twice, by the shuffle).
        assert stats.dial_attempts_failed == stats.picks[f"{cluster.ip_of('ghost')}:{PORT}"] >= 1


async def test_udp_is_listed_as_not_served(cluster: Cluster) -> None:
    await cluster.add_pod("dns-1")
    cluster.api.apply(service("default", "dns", ports=[{"name": "d", "port": 53,
                                                        "protocol": "UDP"}]))
    cluster.api.apply(endpoint_slice("default", "dns-x", "dns",
                                     ports=[{"name": "d", "port": 53, "protocol": "UDP"}],
                                     endpoints=[pod_endpoint("default", "dns-1", "198.18.50.1")]))
    async with uproxy(cluster) as up:
        assert "default/dns  53/udp  ->  not served  (UDP cannot cross port-forward)" in (
            up.tables[-1])


async def test_status_names_each_endpoints_route(cluster: Cluster) -> None:
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"])
    async with uproxy(cluster) as up:
        from uproxy.status import build_status

        status = build_status(up.parts.proxier, None, None, frozenset(), now=0.0)
        (service_entry,) = status["services"]
        (endpoint,) = service_entry["ports"][0]["endpoints"]
        assert endpoint["pod"] == "default/web-1" and endpoint["dial"] == "portforward"


async def test_a_slow_reader_holds_uproxy_to_a_bounded_buffer(cluster: Cluster) -> None:
    """A pod sends 32 MiB to a client that reads nothing: the pod is held back."""
    await cluster.add_pod("flood", serving=False)
    sent = [0]
    loop = asyncio.get_running_loop()

    class Flood(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.transport.set_write_buffer_limits(high=64 * 1024)
            self.chunk = b"z" * 65536
            self.paused = False
            self.fill()

        def fill(self) -> None:
            while not self.paused and sent[0] < 32 * 1024 * 1024:
                self.transport.write(self.chunk)
                sent[0] += len(self.chunk)

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            self.fill()

    cluster.servers.append(await loop.create_server(Flood, cluster.hosts["flood"], PORT,
                                                    reuse_address=True))
    cluster.publish("flood", ["flood"])
    async with uproxy(cluster) as up:
        sock = socket.create_connection(up.address("default/flood", "p"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        try:
            await asyncio.sleep(0)
            await up.wait_for(lambda: sent[0] > 0)
            before = -1
            while sent[0] != before:  # until the pod is held back
                before = sent[0]
                await asyncio.sleep(0.5)
            # Held back: what left the pod sits in the kernel's socket buffers of
            # each hop (megabytes on loopback), the WebSocket's read buffer and one
            # chunk in uproxy. (The e2e test measures uproxy's own memory.)
            assert sent[0] < 24 * 1024 * 1024, f"{sent[0] / 2**20:.1f} MiB left the pod"
        finally:
            sock.close()


async def test_an_api_server_that_cannot_be_reached_is_one_line(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"])
    caplog.set_level(logging.WARNING, logger="uproxy.portforward")
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        cluster.api.in_outage = True  # connections to the API server are cut
        for _ in range(2):
            with contextlib.suppress(ConnectionResetError, asyncio.IncompleteReadError):
                assert await ask(address) == b""
        cluster.api.in_outage = False
        assert await ask(address, b"back") == b"web-1:back"
    lines = [r.getMessage() for r in caplog.records
             if "cannot be reached for port-forward" in r.getMessage()]
    assert len(lines) == 1 and cluster.api.url in lines[0]


async def test_a_pod_behind_port_forward_gets_the_proxy_header_first(cluster: Cluster) -> None:
    await cluster.add_pod("web-1")
    cluster.publish("web", ["web-1"], annotations={"uproxy/proxy-protocol": "v1"})
    async with uproxy(cluster) as up:
        address = up.address("default/web", "p")
        reader, writer = await asyncio.open_connection(*address, local_addr=("127.0.0.9", 0))
        source = writer.get_extra_info("sockname")[:2]
        writer.write(b"x")
        answer = b""
        while not answer.endswith(b"x"):
            answer += await asyncio.wait_for(reader.read(200), 10)
        writer.close()
    # The pod answers "web-1:" and what it got, per read: the header, then the
    # client's byte (in one read or two).
    assert answer.startswith(b"web-1:PROXY TCP4 ")
    assert answer.replace(b"web-1:", b"") == proxy_header(1, source, address) + b"x"
