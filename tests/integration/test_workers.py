"""`uproxy --workers 2` as a user runs it: real processes on loopback, clients
from many 127.0.0.x source addresses.

Given a control process and two workers sharing each listener, ClientIP
affinity holds across workers, round-robin is exact for one client, both
workers serve, UDP replies come from the service address, /metrics shows
the sum, a killed worker is replaced, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.apphelpers import Lines, write_services
from uproxy import reuseport

WORKERS = 2
CLIENTS = [f"127.0.0.{i}" for i in range(1, 17)]


# -- backends: tagged, and they tell which proxy socket reached them ------------


class _TaggedTcp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        tag = self.server.tag  # type: ignore[attr-defined]
        peer_port = self.client_address[1]
        while data := self.request.recv(4096):
            self.request.sendall(f"{tag}:{peer_port}:".encode() + data)


class _TaggedUdp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(self.server.tag.encode() + b":" + data, self.client_address)  # type: ignore[attr-defined]


class _ThreadingTcp(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def backends(tcp: list[str], udp: list[str]) -> Iterator[dict[str, int]]:
    servers: list[socketserver.BaseServer] = []
    ports: dict[str, int] = {}
    try:
        for tag in tcp:
            tcp_server = _ThreadingTcp(("127.0.0.1", 0), _TaggedTcp)
            servers.append(tcp_server)
            ports[tag] = tcp_server.server_address[1]
        for tag in udp:
            udp_server = socketserver.UDPServer(("127.0.0.1", 0), _TaggedUdp)
            servers.append(udp_server)
            ports[tag] = udp_server.server_address[1]
        for server, tag in zip(servers, tcp + udp, strict=True):
            server.tag = tag  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True).start()
        yield ports
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# -- the uproxy process ----------------------------------------------------------


@dataclass
class Uproxy:
    process: subprocess.Popen[str]
    output: Lines  # stdout: the laptop-mode table after every change
    table: dict[str, tuple[str, int, int]]
    stderr: list[str]

    def address(self, service: str) -> tuple[str, int]:
        ip, port, _ = self.table[f"default/{service}"]
        return ip, port

    def workers(self) -> dict[int, int]:
        """Worker index -> pid, from the control process's children."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        found = {}
        for child in children:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_text().split("\0")
                if "uproxy.workers.worker" in argv:
                    found[int(argv[argv.index("--index") + 1])] = int(child)
        return found

    def metrics_url(self) -> str:
        for line in list(self.stderr):
            match = re.search(r"metrics listening on (http://\S+)", line)
            if match:
                return match[1] + "/metrics"
        raise AssertionError("no metrics address logged:\n" + "".join(self.stderr))

    def metric(self, name: str, service: str) -> float:
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and f'service="default/{service}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def uproxy(services: Path, services_count: int, relay: str = "auto") -> Iterator[Uproxy]:
    process = subprocess.Popen(
        [sys.executable, "-m", "uproxy", "--services", str(services), "--workers", str(WORKERS),
         "--bind-range", "127.77.0.0/16", "--healthz-bind-address", "",
         "--metrics-bind-address", "127.0.0.1:0", "--shutdown-grace", "2s", "--relay", relay],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stderr: list[str] = []
    assert process.stderr is not None
    stream = process.stderr
    threading.Thread(target=lambda: stderr.extend(iter(stream.readline, "")), daemon=True).start()
    try:
        output = Lines(process)
        table = output.table(services_count)
        assert len(table) == services_count, "".join(stderr)
        running = Uproxy(process, output, table, stderr)
        wait_until(lambda: len(running.workers()) == WORKERS, "workers to start")
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_until(check: object, what: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def tcp_ask(address: tuple[str, int], client_ip: str) -> tuple[str, int]:
    """(endpoint tag, the proxy's source port toward it) for one new connection."""
    with socket.create_connection(address, timeout=5, source_address=(client_ip, 0)) as sock:
        sock.sendall(b"ping")
        reply = sock.recv(100).decode()
    tag, port, payload = reply.split(":")
    assert payload == "ping"
    return tag, int(port)


def serving_worker(up: Uproxy, address: tuple[str, int], client_ip: str,
                   backend_port: int) -> int:
    """Which worker index relays this client's connection (looked up while it is open)."""
    with socket.create_connection(address, timeout=5, source_address=(client_ip, 0)) as sock:
        sock.sendall(b"ping")
        _, proxy_port, _ = sock.recv(100).decode().split(":")
        inode = _socket_inode(int(proxy_port), backend_port)
        for index, pid in up.workers().items():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return index
    raise AssertionError(f"no worker holds the connection from {client_ip}")


def _socket_inode(local_port: int, remote_port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        ports = (int(local.split(":")[1], 16), int(remote.split(":")[1], 16))
        if ports == (local_port, remote_port):
            return inode
    raise AssertionError(f"no socket 127.0.0.1:{local_port} -> :{remote_port}")


# -- one uproxy with three services, shared by the timelines below ---------------


@pytest.fixture(scope="module", params=[
    "auto",
    pytest.param("sockmap", marks=pytest.mark.skipif(
        os.geteuid() != 0, reason="--relay sockmap needs root (it would run as auto)")),
])
def running(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[tuple[Uproxy, dict[str, int]]]:
    with backends(["a", "b", "c"], ["u1", "u2"]) as ports, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refusing:
        # Bound and never listening: dials to it are refused, and no other
        # program can take the port while the module runs.
        refusing.bind(("127.0.0.1", 0))
        ports["dead"] = refusing.getsockname()[1]
        services = tmp_path_factory.mktemp("workers") / "services.yaml"
        tcp_endpoints = [f"127.0.0.1:{ports[tag]}" for tag in ("a", "b", "c")]
        write_services(services, [
            {"name": "failover", "ports": [{"port": 8080}],
             "endpoints": [f"127.0.0.1:{ports['dead']}", f"127.0.0.1:{ports['a']}"]},
            {"name": "sticky", "sessionAffinity": "ClientIP", "ports": [{"port": 8080}],
             "endpoints": tcp_endpoints},
            {"name": "rr", "ports": [{"port": 8080}], "endpoints": tcp_endpoints},
            {"name": "counted", "ports": [{"port": 8080}], "endpoints": tcp_endpoints},
            {"name": "dns", "ports": [{"port": 5353, "protocol": "UDP"}],
             "endpoints": [f"127.0.0.1:{ports['u1']}", f"127.0.0.1:{ports['u2']}"]},
        ])
        with uproxy(services, 5, request.param) as up:
            yield up, ports


def test_client_ip_affinity_holds_across_workers(running: tuple[Uproxy, dict[str, int]]) -> None:
    up, _ = running
    sticky = up.address("sticky")
    chosen = {}
    for client_ip in CLIENTS:
        tags = {tcp_ask(sticky, client_ip)[0] for _ in range(4)}
        assert len(tags) == 1, f"{client_ip} reached {tags}"
        chosen[client_ip] = tags.pop()
    assert len(set(chosen.values())) >= 2  # clients are spread, each one stays put


def test_round_robin_is_exact_for_one_client(running: tuple[Uproxy, dict[str, int]]) -> None:
    up, _ = running
    rr = up.address("rr")
    order = [tcp_ask(rr, "127.0.0.99")[0] for _ in range(9)]
    assert collections.Counter(order) == {"a": 3, "b": 3, "c": 3}
    assert order[:3] * 3 == order  # the same cycle, over and over


def test_both_workers_serve_and_each_client_stays_on_its_worker(
    running: tuple[Uproxy, dict[str, int]],
) -> None:
    up, ports = running
    sticky = up.address("sticky")
    tag, _ = tcp_ask(sticky, CLIENTS[0])
    seen = {}
    for client_ip in CLIENTS:
        tag, _ = tcp_ask(sticky, client_ip)
        worker = serving_worker(up, sticky, client_ip, ports[tag])
        assert worker == reuseport.worker_index(client_ip, WORKERS)
        seen[client_ip] = worker
    assert set(seen.values()) == set(range(WORKERS))


def test_udp_replies_come_from_the_service_address(
    running: tuple[Uproxy, dict[str, int]],
) -> None:
    up, _ = running
    dns = up.address("dns")
    tags = collections.Counter()
    for client_ip in CLIENTS[:8]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((client_ip, 0))
            sock.settimeout(3)
            for _ in range(2):
                sock.sendto(b"q", dns)
                reply, source = sock.recvfrom(100)
                assert source == dns
                tag, payload = reply.split(b":")
                assert payload == b"q"
                tags[tag] += 1
    assert sum(tags.values()) == 16
    assert set(tags) == {b"u1", b"u2"}  # sessions from 8 clients spread over both endpoints


def test_metrics_in_the_control_process_sum_the_workers(
    running: tuple[Uproxy, dict[str, int]],
) -> None:
    up, _ = running
    counted = up.address("counted")  # only this test connects to it
    moved = 0
    for client_ip in CLIENTS:
        tag, proxy_port = tcp_ask(counted, client_ip)
        moved += len(b"ping") + len(f"{tag}:{proxy_port}:ping")
    assert {reuseport.worker_index(ip, WORKERS) for ip in CLIENTS} == {0, 1}
    wait_until(lambda: up.metric("uproxy_connections_total", "counted") == len(CLIENTS),
               "summed connection count", timeout=5)
    assert up.metric("uproxy_endpoint_picks_total", "counted") == len(CLIENTS)
    wait_until(lambda: up.metric("uproxy_connections_active", "counted") == 0, "no active", 5)
    assert up.metric("uproxy_bytes_total", "counted") == moved


def test_dial_failures_after_failover_are_summed_over_the_workers(
    running: tuple[Uproxy, dict[str, int]],
) -> None:
    up, _ = running
    failover = up.address("failover")  # endpoints: a refusing port and "a"
    clients = [next(ip for ip in CLIENTS if reuseport.worker_index(ip, WORKERS) == index)
               for index in range(WORKERS)]  # one client per worker

    def settled(connections: int) -> bool:
        return (up.metric("uproxy_connections_total", "failover") == connections
                and up.metric("uproxy_connections_active", "failover") == 0)

    # Each worker round-robins over its own shuffle of [dead, a]: its first
    # connection hits the dead endpoint or not; a failed dial fails over to
    # "a", which leaves the dead one next again, so every later connection
    # on that worker dials it exactly once before being served.
    for client_ip in clients:
        assert tcp_ask(failover, client_ip)[0] == "a"
    wait_until(lambda: settled(WORKERS), "first connections reported", timeout=5)
    first = up.metric("uproxy_dial_failures_total", "failover")
    assert 0 <= first <= WORKERS
    per_client = 5
    for client_ip in clients:
        for _ in range(per_client):
            assert tcp_ask(failover, client_ip)[0] == "a"
    wait_until(lambda: settled(WORKERS * (1 + per_client)), "connections reported", timeout=5)
    assert up.metric("uproxy_dial_failures_total", "failover") == first + WORKERS * per_client
    assert up.metric("uproxy_connection_failures_total", "failover") == 0  # nobody was reset


def test_a_killed_worker_is_restarted_and_sigterm_leaves_no_worker(tmp_path: Path) -> None:
    with backends(["a"], []) as ports:
        services = tmp_path / "services.yaml"
        write_services(services, [{"name": "web", "ports": [{"port": 8080}],
                                   "endpoints": [f"127.0.0.1:{ports['a']}"]}])
        with uproxy(services, 1) as up:
            web = up.address("web")
            client_ip = CLIENTS[2]
            index = reuseport.worker_index(client_ip, WORKERS)
            old = up.workers()
            os.kill(old[index], signal.SIGKILL)
            # The control process still holds the socket: this connection waits
            # in its queue for the replacement instead of being refused.
            assert tcp_ask(web, client_ip)[0] == "a"
            now = up.workers()
            assert now[index] != old[index]
            assert now[1 - index] == old[1 - index]
            for other in CLIENTS[:6]:
                assert tcp_ask(web, other)[0] == "a"
            restarted = [line for line in up.stderr if "restarted as pid" in line]
            assert len(restarted) == 1 and f"pid {old[index]}" in restarted[0]

            up.process.send_signal(signal.SIGTERM)
            assert up.process.wait(timeout=10) == 0
            for pid in now.values():
                assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(web, timeout=2)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    return True


def test_changes_reach_every_worker(tmp_path: Path) -> None:
    with backends(["a", "b"], []) as ports:
        services = tmp_path / "services.yaml"
        write_services(services, [{"name": "one", "ports": [{"port": 8080}],
                                   "endpoints": [f"127.0.0.1:{ports['a']}"]}])
        with uproxy(services, 1) as up:
            one = up.address("one")
            assert {tcp_ask(one, ip)[0] for ip in CLIENTS[:6]} == {"a"}

            # Given new endpoints for one and a new service two, after a reload
            # every client (so both workers) sees them.
            write_services(services, [
                {"name": "one", "ports": [{"port": 8080}],
                 "endpoints": [f"127.0.0.1:{ports['b']}"]},
                {"name": "two", "ports": [{"port": 8080}],
                 "endpoints": [f"127.0.0.1:{ports['a']}"]},
            ])
            up.process.send_signal(signal.SIGHUP)
            ip, port, _ = up.output.table(2)["default/two"]
            two = (ip, port)
            wait_until(lambda: {tcp_ask(one, ip)[0] for ip in CLIENTS[:6]} == {"b"},
                       "new endpoints")
            assert {tcp_ask(two, ip)[0] for ip in CLIENTS[:6]} == {"a"}

            # After one is deleted its listener is closed in every worker.
            write_services(services, [{"name": "two", "ports": [{"port": 8080}],
                                       "endpoints": [f"127.0.0.1:{ports['a']}"]}])
            up.process.send_signal(signal.SIGHUP)
            wait_until(lambda: all(_refused(one, ip) for ip in CLIENTS[:6]), "one closed")
            assert {tcp_ask(two, ip)[0] for ip in CLIENTS[:6]} == {"a"}


def _refused(address: tuple[str, int], client_ip: str) -> bool:
    """Whether the listener is gone. While it closes, a connection may still
    complete its handshake into a worker's accept queue and be reset when that
    socket closes (or find the endpoints already gone): not yet refused."""
    try:
        tcp_ask(address, client_ip)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False
