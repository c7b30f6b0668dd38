"""The data path under stress, through the real `uproxy` command in laptop
mode: a reader that stalls while 96 MiB flows, resets from either side, and
churn of 10,000 TCP connections and 2,000 UDP clients. Memory and descriptors
are read from /proc and must come back."""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    Backend,
    pattern,
    running_uproxy,
    wait_for,
    write_services,
)

MiB = 1024 * 1024
BULK = 96 * MiB
STALL = 3.0  # seconds the reader does not read
# What uproxy may add to its resident memory while a reader stalls: a bounded
# buffer per connection, not the 96 MiB in flight.
RSS_BOUND = 24 * MiB


def _sink(conn: socket.socket, stall: float) -> bytes:
    """Stall, then read to EOF; the SHA-256 and length of what came."""
    time.sleep(stall)
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    return digest.digest() + struct.pack("!Q", total)


def _peak_rss_while(pid_rss: Callable[[], int], done: threading.Event) -> list[int]:
    samples: list[int] = []
    while not done.is_set():
        samples.append(pid_rss())
        time.sleep(0.05)
    return samples


@pytest.mark.parametrize("relay", ["auto", "protocol"])
@pytest.mark.parametrize("direction", ["client to endpoint", "endpoint to client"])
def test_a_stalled_reader_bounds_memory_and_every_byte_arrives(
    tmp_path: Path, backends: list[Backend], direction: str, relay: str
) -> None:
    data = pattern(BULK)
    expected = hashlib.sha256(data).digest() + struct.pack("!Q", BULK)
    upstream = direction == "client to endpoint"

    def handle(conn: socket.socket) -> None:
        if upstream:  # the endpoint is the slow reader
            conn.sendall(_sink(conn, STALL))
        else:  # the endpoint floods a client that stalls
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)

    backends.append(Backend(handle))
    services = tmp_path / "services.json"
    write_services(services, [{"name": "bulk", "ports": [{"port": 9000}],
                               "endpoints": [f"127.0.0.1:{backends[0].port}"]}])
    with running_uproxy(services, "--relay", relay) as up:
        baseline = up.rss()
        done = threading.Event()
        samples: list[int] = []
        sampler = threading.Thread(target=lambda: samples.extend(_peak_rss_while(up.rss, done)))
        sampler.start()
        try:
            with socket.create_connection(up.address("default/bulk"), timeout=30) as client:
                if upstream:
                    client.sendall(data)
                    client.shutdown(socket.SHUT_WR)
                    answer = b""
                    while chunk := client.recv(64):
                        answer += chunk
                else:
                    answer = _sink(client, STALL)
                    client.close()
        finally:
            done.set()
            sampler.join()
    assert answer == expected
    growth = max(samples) - baseline
    print(f"stalled reader, {direction}, --relay {relay}: RSS {baseline / MiB:.1f} MiB, "
          f"peak +{growth / MiB:.1f}")
    assert growth < RSS_BOUND, f"uproxy grew {growth / MiB:.1f} MiB while a reader stalled"


@pytest.mark.parametrize("who", ["client", "endpoint"])
def test_a_reset_reaches_the_other_side_within_a_second(
    tmp_path: Path, backends: list[Backend], who: str
) -> None:
    seen: list[tuple[str, float]] = []
    endpoint_ready = threading.Event()
    reset_now = threading.Event()

    def handle(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        endpoint_ready.set()
        if who == "endpoint":
            reset_now.wait(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST
            return
        conn.settimeout(10)
        try:
            data = conn.recv(10)
            seen.append(("eof" if not data else "data", time.monotonic()))
        except ConnectionResetError:
            seen.append(("reset", time.monotonic()))

    backends.append(Backend(handle))
    services = tmp_path / "services.json"
    write_services(services, [{"name": "r", "ports": [{"port": 9001}],
                               "endpoints": [f"127.0.0.1:{backends[0].port}"]}])
    with running_uproxy(services) as up:
        baseline = up.fds()
        for _ in range(3):
            endpoint_ready.clear()
            reset_now.clear()
            seen.clear()
            client = socket.create_connection(up.address("default/r"), timeout=10)
            assert client.recv(5) == b"hello"
            assert endpoint_ready.wait(5)
            started = time.monotonic()
            if who == "client":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                wait_for(lambda: bool(seen), 5, "the endpoint to notice")
                (outcome, when), = seen
                assert outcome in ("reset", "eof")
            else:
                reset_now.set()
                try:
                    data = client.recv(10)
                    outcome = "eof" if not data else "data"
                except ConnectionResetError:
                    outcome = "reset"
                when = time.monotonic()
                client.close()
                assert outcome in ("reset", "eof")
            assert when - started < 1.0, f"the other side knew after {when - started:.2f}s"
            print(f"reset by the {who}: the other side saw {outcome} after "
                  f"{(when - started) * 1000:.1f} ms")
        wait_for(lambda: up.fds() == baseline, 5, f"descriptors back to {baseline}")


TCP_CONNECTIONS = 10_000
UDP_CLIENTS = 2_000
UDP_TIMEOUT = 2.0


def test_churn_leaves_descriptors_and_memory_where_they_were(
    tmp_path: Path, backends: list[Backend]
) -> None:
    def echo(conn: socket.socket) -> None:
        conn.sendall(conn.recv(64))

    backends.append(Backend(echo))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def udp_echo() -> None:
        udp.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = udp.recvfrom(2048)
            except TimeoutError:
                continue
            udp.sendto(data, peer)

    udp_thread = threading.Thread(target=udp_echo, daemon=True)
    udp_thread.start()
    services = tmp_path / "services.json"
    write_services(services, [
        {"name": "t", "ports": [{"port": 9002}], "endpoints": [f"127.0.0.1:{backends[0].port}"]},
        {"name": "u", "ports": [{"port": 9003, "protocol": "UDP"}],
         "endpoints": [f"127.0.0.1:{udp.getsockname()[1]}"]},
    ])
    try:
        with running_uproxy(services, "--udp-timeout", f"{UDP_TIMEOUT:g}s", count=2) as up:
            tcp_address = up.address("default/t", 2)
            udp_address = up.address("default/u", 2)
            # Warm up (first allocations; the loop's epoll set is made on the first
            # connection), let the warm-up's UDP session expire, then take the baseline.
            started_with = up.fds()
            assert _tcp_round(tcp_address, 0) and _udp_round(udp_address, 0)
            wait_for(lambda: up.fds() <= started_with + 1, UDP_TIMEOUT + 10,
                     "the warm-up's UDP session to expire")
            base_fds, base_rss = up.fds(), up.rss()

            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                failures = sum(not ok for ok in pool.map(
                    lambda i: _tcp_round(tcp_address, i), range(TCP_CONNECTIONS)))
                assert failures == 0
                answered = sum(pool.map(lambda i: _udp_round(udp_address, i),
                                        range(UDP_CLIENTS)))
            assert answered >= UDP_CLIENTS * 0.99  # UDP may drop; loopback rarely does
            peak_fds = up.fds()

            wait_for(lambda: up.fds() <= base_fds, UDP_TIMEOUT + 10,
                     f"descriptors back to {base_fds} after the UDP timeout")
            growth = up.rss() - base_rss
            assert growth < 16 * MiB, f"RSS {growth / MiB:.1f} MiB above the baseline"
            print(f"churn: fds {base_fds} -> {peak_fds} -> {up.fds()}, "
                  f"RSS {base_rss / MiB:.1f} -> {up.rss() / MiB:.1f} MiB")
    finally:
        stop.set()
        udp_thread.join()
        udp.close()


def _tcp_round(address: tuple[str, int], i: int) -> bool:
    payload = f"ping {i}".encode()
    try:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(payload)
            return sock.recv(64) == payload
    except OSError:
        return False


def _udp_round(address: tuple[str, int], i: int) -> bool:
    payload = f"datagram {i}".encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # a new client each time
        sock.settimeout(2)
        try:
            sock.sendto(payload, address)
            return sock.recv(64) == payload
        except OSError:
            return False
