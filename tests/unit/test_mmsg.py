"""recvmmsg through ctypes: what the kernel hands over, byte for byte, with
the source address, the local address a datagram was sent to, and the size
of datagrams it coalesced."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from uproxy.relay import mmsg


@contextlib.contextmanager
def udp(host: str) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        yield sock


def wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 2.0)[0], "nothing arrived"


def test_the_c_layout_is_the_one_struct_writes() -> None:
    assert mmsg.HEADER.size == 64
    assert mmsg.IOVEC.size == 16


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_batch_keeps_every_datagram_whole_and_in_order(host: str) -> None:
    payloads = [b"", b"x", bytes(range(256)) * 5, b"y" * 1400, b"z" * 65507]
    receiver = mmsg.Receiver(4, control=False)
    with udp(host) as listener, udp(host) as client:
        for payload in payloads:
            client.sendto(payload, listener.getsockname())
        wait_readable(listener)

        got = []
        for _ in range(2):  # 5 datagrams, 4 slots: two calls
            count = receiver.receive(listener.fileno())
            for data, source, local, segment in receiver.messages(count):
                got.append(bytes(data))
                assert mmsg.decode_address(source) == client.getsockname()
                assert (local, segment) == (b"", 0)

        assert got == payloads
        assert receiver.receive(listener.fileno()) == 0  # EAGAIN is no error


@pytest.mark.parametrize(("host", "target", "level", "option"), [
    ("0.0.0.0", "127.0.0.3", socket.IPPROTO_IP, mmsg.IP_PKTINFO),
    ("::", "::1", socket.IPPROTO_IPV6, 49),  # IPV6_RECVPKTINFO
])
def test_the_local_address_a_datagram_was_sent_to(host: str, target: str, level: int,
                                                  option: int) -> None:
    receiver = mmsg.Receiver(8, control=True)
    with udp(host) as listener, udp(target) as client:
        listener.setsockopt(level, option, 1)
        client.sendto(b"where", (target, listener.getsockname()[1]))
        wait_readable(listener)

        assert receiver.receive(listener.fileno()) == 1
        [(data, _, local, _)] = receiver.messages(1)

        assert bytes(data) == b"where"
        assert mmsg.local_ip(local) == target


def test_a_coalesced_train_comes_with_its_segment_size() -> None:
    receiver = mmsg.Receiver(4, control=True)
    with udp("127.0.0.1") as listener, udp("127.0.0.1") as client:
        listener.setsockopt(mmsg.SOL_UDP, mmsg.UDP_GRO, 1)
        train = b"a" * 1000 + b"b" * 1000 + b"c" * 10
        client.sendmsg([train], [(mmsg.SOL_UDP, mmsg.UDP_SEGMENT, struct.pack("=H", 1000))],
                       0, listener.getsockname())
        wait_readable(listener)

        assert receiver.receive(listener.fileno()) == 1
        [(data, _, _, segment)] = receiver.messages(1)

        assert (bytes(data), segment) == (train, 1000)
