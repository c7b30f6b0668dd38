"""The reuseport steering program: the kernel picks the socket Python predicts,
from the client's source address alone (TCP, UDP, IPv4, IPv6, dual-stack)."""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Iterator

import pytest

from uproxy import reuseport

CLIENTS = [f"127.0.0.{i}" for i in range(1, 25)]


@contextlib.contextmanager
def group(kind: int, host: str, size: int) -> Iterator[tuple[list[socket.socket], int]]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    members: list[socket.socket] = []
    port = 0
    try:
        for _ in range(size):
            sock = socket.socket(family, kind)
            members.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            if kind == socket.SOCK_STREAM:
                sock.listen(16)
            sock.setblocking(False)
        reuseport.attach(members[0], size)
        yield members, port
    finally:
        for sock in members:
            sock.close()


def receiver(members: list[socket.socket]) -> int:
    """Which member has something to read (exactly one must)."""
    ready, _, _ = select.select(members, [], [], 2.0)
    assert len(ready) == 1, f"expected one ready socket, got {len(ready)}"
    return members.index(ready[0])


def tcp_lands_on(members: list[socket.socket], client_ip: str, server: tuple[str, int]) -> int:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.bind((client_ip, 0))
        client.connect(server)
        index = receiver(members)
        conn, _ = members[index].accept()
        conn.close()
        return index


def udp_lands_on(members: list[socket.socket], client_ip: str, server: tuple[str, int]) -> int:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.bind((client_ip, 0))
        client.sendto(b"x", server)
        index = receiver(members)
        members[index].recvfrom(16)
        return index


def test_program_shape() -> None:
    insns = reuseport.program(3)
    assert insns[-1] == (0x16, 0, 0, 0)  # ret A
    assert (0x94, 0, 0, 3) in insns  # A %= 3, in both branches
    with pytest.raises(ValueError, match="groups"):
        reuseport.program(0)


def test_worker_index_spreads_and_maps_v4_in_v6() -> None:
    picks = {reuseport.worker_index(ip, 2) for ip in CLIENTS}
    assert picks == {0, 1}
    assert reuseport.worker_index("::ffff:127.0.0.7", 4) == reuseport.worker_index("127.0.0.7", 4)
    assert all(0 <= reuseport.worker_index(f"10.{i}.0.1", 3) < 3 for i in range(50))


@pytest.mark.parametrize("size", [2, 3])
def test_tcp_ipv4_follows_source_ip(size: int) -> None:
    with group(socket.SOCK_STREAM, "127.0.0.1", size) as (members, port):
        for client_ip in CLIENTS:
            expected = reuseport.worker_index(client_ip, size)
            for _ in range(2):  # a new source port each time; the same socket
                assert tcp_lands_on(members, client_ip, ("127.0.0.1", port)) == expected


def test_udp_ipv4_follows_source_ip() -> None:
    with group(socket.SOCK_DGRAM, "127.0.0.1", 2) as (members, port):
        landed = set()
        for client_ip in CLIENTS:
            index = udp_lands_on(members, client_ip, ("127.0.0.1", port))
            assert index == reuseport.worker_index(client_ip, 2)
            landed.add(index)
        assert landed == {0, 1}


def test_dual_stack_socket_steers_ipv4_clients() -> None:
    with group(socket.SOCK_STREAM, "::", 2) as (members, port):
        for client_ip in CLIENTS[:8]:
            landed = tcp_lands_on(members, client_ip, ("127.0.0.1", port))
            assert landed == reuseport.worker_index(client_ip, 2)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_ipv6_uses_the_source_address(size: int) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    expected = reuseport.worker_index("::1", size)
    with group(socket.SOCK_STREAM, "::1", size) as (members, port):
        assert {tcp_lands_on(members, "::1", ("::1", port)) for _ in range(4)} == {expected}
    with group(socket.SOCK_DGRAM, "::1", size) as (members, port):
        assert {udp_lands_on(members, "::1", ("::1", port)) for _ in range(4)} == {expected}
