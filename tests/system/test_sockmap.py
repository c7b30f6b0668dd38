"""`--relay sockmap`: the kernel moves a joined connection's bytes.

Given a relay in sockmap mode (its own event loop in a thread, real loopback
sockets, the process's SOCKHASH), each timeline checks what a user sees:
every byte, in order, both half-closes, resets within a second, exact byte
counts, and nothing left in the map or the descriptor table afterwards.
Needs root (bpf(2) with CAP_BPF and CAP_NET_ADMIN); skips with the reason
otherwise, or fails under UPROXY_REQUIRE_SYSTEM=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from tests.conftest import require_system
from tests.integration.apphelpers import Lines, write_services
from tests.integration.relay_helpers import FixedPicker
from uproxy.bpf import asm
from uproxy.bpf.sockmap import SockMap, sockmap, unavailable
from uproxy.bpf.syscall import PROG_TYPE_SK_SKB, BpfError, prog_load
from uproxy.model import Endpoint
from uproxy.relay.tcp import TcpServer
from uproxy.stats import PortStats

pytestmark = pytest.mark.system

MiB = 1024 * 1024
PATTERN = bytes(range(251)) * 4177  # ~1 MiB; 251 is prime, so a misplaced chunk shows


def stream(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
        if sum(map(len, chunks)) > limit:
            break
    return b"".join(chunks)


class Backend:
    """A listener whose every connection is served by `handler` in a thread."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.handler = handler
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class Relay:
    """A sockmap-mode TcpServer on its own uvloop in a thread."""

    def __init__(self, endpoint: Endpoint, mode: str = "sockmap", proxy_protocol: int = 0) -> None:
        self.stats = PortStats()
        listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self.loop = uvloop.new_event_loop()
        self.server = TcpServer(listener, FixedPicker(endpoint), self.stats, mode=mode,
                                proxy_protocol=proxy_protocol)
        assert self.server.mode == mode
        started = threading.Event()

        def begin() -> None:
            self.server.start()
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(begin)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(5)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def joined(self) -> int:
        return sum(1 for conn in list(self.server._conns)
                   if getattr(conn, "joined", None) is not None)

    def close(self) -> None:
        def stop() -> None:
            self.server.stop_accepting()
            self.server.abort()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def the_map() -> SockMap:
    require_system()
    found = sockmap()
    if found is None:
        pytest.skip(f"sockmap is not available here: {unavailable()}")
    return found


@pytest.fixture
def relay_to(the_map: SockMap) -> Iterator[Callable[[Callable[[socket.socket], None]], Relay]]:
    made: list[tuple[Backend, Relay]] = []

    def make(handler: Callable[[socket.socket], None], mode: str = "sockmap",
             proxy_protocol: int = 0) -> Relay:
        backend = Backend(handler)
        relay = Relay(backend.endpoint, mode, proxy_protocol)
        made.append((backend, relay))
        return relay

    yield make
    for backend, relay in made:
        relay.close()
        backend.close()
        assert not backend.errors, backend.errors
    wait_until(lambda: the_map.keys() == [], "the map to be empty")


def test_the_verdict_program_loads_and_a_bad_one_shows_the_verifier_log(the_map: SockMap) -> None:
    assert the_map.keys() == []
    bad = asm.assemble(asm.exit_())  # returns r0 without ever setting it
    with pytest.raises(BpfError) as caught:
        prog_load(PROG_TYPE_SK_SKB, bad, name="bad")
    assert "R0 !read_ok" in caught.value.log
    assert "R0 !read_ok" in str(caught.value)


@pytest.mark.parametrize("first", ["client", "backend"])
def test_one_mib_each_way_half_closed_both_ways(relay_to: Callable[..., Relay],
                                                 first: str) -> None:
    up_payload, down_payload = stream(MiB), stream(MiB)[::-1]
    got_by_backend: list[bytes] = []

    def backend(conn: socket.socket) -> None:
        assert conn.recv(5) == b"hello"
        conn.sendall(b"hi")  # the first answer: from here on the connection joins
        if first == "client":
            got_by_backend.append(recv_all(conn))  # until the client's FIN
            conn.sendall(down_payload)
            conn.shutdown(socket.SHUT_WR)
        else:
            conn.sendall(down_payload)
            conn.shutdown(socket.SHUT_WR)
            got_by_backend.append(recv_all(conn))

    relay = relay_to(backend)
    with relay.connect() as client:
        client.sendall(b"hello")
        assert client.recv(2) == b"hi"
        wait_until(lambda: relay.joined() == 1, "the connection to join the map")
        assert len(sockmap().keys()) == 8  # members, peers, used, limits  # type: ignore[union-attr]
        if first == "client":
            client.sendall(up_payload)
            client.shutdown(socket.SHUT_WR)
            got = recv_all(client)
        else:
            got = recv_all(client)  # the backend's FIN came through: now answer
            client.sendall(up_payload)
            client.shutdown(socket.SHUT_WR)
            wait_until(lambda: bool(got_by_backend), "the backend to read to EOF")
    assert got == down_payload
    assert got_by_backend == [up_payload]
    wait_until(lambda: relay.stats.connections_active == 0, "the connection to close")
    assert (relay.stats.bytes_in, relay.stats.bytes_out) == (5 + MiB, 2 + MiB)


def test_a_proxy_header_first_then_a_joined_conversation_counted_exactly(
        relay_to: Callable[..., Relay]) -> None:
    up_payload, down_payload = stream(MiB), stream(MiB)[::-1]
    got_by_backend: list[bytes] = []

    def backend(conn: socket.socket) -> None:
        header = b""
        while not header.endswith(b"\r\n"):
            header += conn.recv(1)
        got_by_backend.append(header)
        assert conn.recv(5) == b"hello"
        conn.sendall(b"hi")
        got_by_backend.append(recv_all(conn))
        conn.sendall(down_payload)

    relay = relay_to(backend, proxy_protocol=1)
    with relay.connect() as client:
        client.sendall(b"hello")
        assert client.recv(2) == b"hi"
        wait_until(lambda: relay.joined() == 1, "the connection to join the map")
        client.sendall(up_payload)
        client.shutdown(socket.SHUT_WR)
        got = recv_all(client)
        source = client.getsockname()
    header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {source[1]} {relay.port}\r\n"
    assert got_by_backend[0] == header.encode()
    assert got_by_backend[1] == up_payload
    assert got == down_payload
    wait_until(lambda: relay.stats.connections_active == 0, "the connection to close")
    assert (relay.stats.bytes_in, relay.stats.bytes_out) == (5 + MiB, 2 + MiB)


def test_a_stream_that_never_pauses_keeps_its_order_across_the_join(
        relay_to: Callable[..., Relay]) -> None:
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    relay = relay_to(echo)
    payload = stream(16 * MiB)
    with relay.connect() as client:
        def write() -> None:
            for at in range(0, len(payload), 1000):  # small writes, never waiting
                client.sendall(payload[at:at + 1000])
            client.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        got = recv_all(client)
        writer.join()
    assert got == payload
    assert relay.stats.bytes_in == relay.stats.bytes_out == len(payload)


STALL_BYTES = 96 * MiB
# Socket buffers on both sides of the relay: measured here, `auto` lets
# 9.5-16 MiB leave the backend (the relay's endpoint socket autotunes its
# receive buffer to ~8 MiB, tcp_rmem's maximum is 32 MiB); sockmap adds up to
# a credit and a half in the kernel's queue. Without the credit: all 96 MiB.
KERNEL_BOUND = 32 * MiB


@pytest.mark.parametrize("mode", ["auto", "sockmap"])
def test_a_stalled_reader_holds_the_sender_back(relay_to: Callable[..., Relay],
                                                mode: str) -> None:
    """The client stops reading for two seconds while the backend tries to send
    96 MiB: what the backend gets rid of meanwhile is what the kernel (and the
    relay, in this same process) must hold. Then the client reads every byte,
    in order."""
    payload = stream(STALL_BYTES)
    sent_while_stalled: list[int] = []
    stalled = threading.Event()

    def backend(conn: socket.socket) -> None:
        conn.recv(5)
        conn.sendall(b"hi")
        conn.setblocking(False)
        at = 0
        deadline = time.monotonic() + 2.0
        # A view, not a 1 MiB copy a send: the backend stands in for another
        # process, and copying under the GIL delayed the relay's thread in this
        # one (its reaction to a used-up credit is what bounds sockmap here).
        view = memoryview(payload)
        while at < len(payload) and time.monotonic() < deadline:
            try:
                at += conn.send(view[at:at + MiB])
            except BlockingIOError:
                time.sleep(0.01)
        sent_while_stalled.append(at)
        stalled.set()
        conn.setblocking(True)
        conn.sendall(payload[at:])
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)

    relay = relay_to(backend, mode)
    with relay.connect() as client:
        client.sendall(b"hello")
        assert client.recv(2) == b"hi"
        assert stalled.wait(10)
        client.shutdown(socket.SHUT_WR)
        got = recv_all(client)
    assert got == payload
    assert sent_while_stalled[0] < KERNEL_BOUND, (
        f"{sent_while_stalled[0] / MiB:.0f} MiB left the backend while the client read nothing")
    wait_until(lambda: relay.stats.connections_active == 0, "the connection to close")
    assert relay.stats.bytes_out == 2 + STALL_BYTES


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_reset_reaches_the_other_side_within_a_second(relay_to: Callable[..., Relay],
                                                        side: str) -> None:
    outcome: list[str] = []
    backend_conn: list[socket.socket] = []
    reset_now = threading.Event()

    def backend(conn: socket.socket) -> None:
        conn.recv(5)
        conn.sendall(b"hi")
        if side == "backend":
            reset_now.wait(5)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        backend_conn.append(conn)
        try:
            outcome.append(f"eof after {len(recv_all(conn))}")
        except ConnectionResetError:
            outcome.append("reset")

    relay = relay_to(backend)
    client = relay.connect()
    client.sendall(b"hello")
    assert client.recv(2) == b"hi"
    wait_until(lambda: relay.joined() == 1, "the connection to join the map")
    started = time.monotonic()
    if side == "client":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_until(lambda: bool(outcome), "the backend to see the reset", timeout=1.0)
        assert outcome == ["reset"]
    else:
        reset_now.set()
        client.settimeout(1.0)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()
    assert time.monotonic() - started < 1.0
    wait_until(lambda: relay.stats.connections_active == 0, "the relay to close both")


def test_churn_leaves_no_map_entries_and_no_descriptors(relay_to: Callable[..., Relay],
                                                        the_map: SockMap) -> None:
    def answer(conn: socket.socket) -> None:
        if conn.recv(4) == b"ping":
            conn.sendall(b"pong")
            recv_all(conn)

    relay = relay_to(answer)
    # Up to 10,000 connections or 20 seconds, whichever comes first (each is
    # a thread in the backend here; the proxy's side is what is measured).
    before = len(os.listdir("/proc/self/fd"))
    deadline = time.monotonic() + 20
    done = 0
    while done < 10_000 and time.monotonic() < deadline:
        with relay.connect() as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"pong"
        done += 1
    wait_until(lambda: relay.stats.connections_active == 0, "every connection to close", 10)
    print(f"churn: {done} connections")
    assert relay.stats.connections_accepted == done >= 1000
    assert the_map.keys() == []
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before, "descriptors to be freed")
    assert relay.stats.bytes_in == relay.stats.bytes_out == 4 * done


def test_without_privilege_sockmap_says_why_once_and_relays_as_auto(tmp_path: Path) -> None:
    require_system("setpriv")

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    backend = Backend(echo)
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "web", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{backend.endpoint.port}"]}])
    process = subprocess.Popen(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all",  # root with no capability
         sys.executable, "-m", "uproxy", "--services", str(services), "--relay", "sockmap",
         "--bind-range", "127.78.0.0/16", "--healthz-bind-address", "",
         "--metrics-bind-address", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        table = Lines(process).table(1)
        ip, port, _ = table["default/web"]
        with socket.create_connection((ip, port), timeout=5) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        backend.close()
    assert process.returncode == 0, stderr
    said = [line for line in stderr.splitlines() if "sockmap" in line]
    assert len(said) == 1, stderr
    assert "not available, relaying with auto instead" in said[0]
    assert "CAP_BPF" in said[0]
