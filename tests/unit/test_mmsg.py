"""recvmmsg/sendmmsg through ctypes: what the kernel hands over, byte for byte,
with the source address, the local address a datagram was sent to, and the
datagrams the kernel refuses counted, not lost silently."""

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
            for i in range(count):
                data, source, local = receiver.message(i)
                got.append(bytes(data))
                assert mmsg.decode_address(source) == client.getsockname()
                assert local == b""

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
        data, _, local = receiver.message(0)

        assert bytes(data) == b"where"
        assert mmsg.local_ip(local) == target


def test_a_send_batch_goes_in_order_with_each_destination_and_source() -> None:
    sender = mmsg.Sender(4, 4 * mmsg.MAX_DATAGRAM)
    with udp("0.0.0.0") as listener, udp("127.0.0.1") as first, udp("127.0.0.1") as second:
        keep = []  # the caller keeps names and control data alive until the flush
        for payload, peer, source in ((b"1", first, "127.0.0.2"), (b"22", second, "127.0.0.3"),
                                      (b"", first, "127.0.0.4"), (b"4444", second, "127.0.0.2")):
            name = struct.pack("=H", socket.AF_INET) + struct.pack(
                "!H", peer.getsockname()[1]) + socket.inet_aton("127.0.0.1") + bytes(8)
            control = mmsg.control_message(socket.IPPROTO_IP, mmsg.IP_PKTINFO, struct.pack(
                "=i4s4s", 0, socket.inet_aton(source), bytes(4)))
            keep += [name, control]
            space = sender.space()
            space[:len(payload)] = payload
            sender.push(len(payload), mmsg.bytes_address(name), len(name),
                        mmsg.bytes_address(control), len(control))
        assert sender.full  # four slots used

        assert sender.flush(listener.fileno()) == (4, 7, 0)

        port = listener.getsockname()[1]
        wait_readable(first)
        assert first.recvfrom(100) == (b"1", ("127.0.0.2", port))
        assert first.recvfrom(100) == (b"", ("127.0.0.4", port))
        wait_readable(second)
        assert second.recvfrom(100) == (b"22", ("127.0.0.3", port))
        assert second.recvfrom(100) == (b"4444", ("127.0.0.2", port))
        assert sender.count == 0 and not sender.full


def test_a_refused_datagram_is_dropped_and_the_rest_still_go() -> None:
    sender = mmsg.Sender(8, mmsg.MAX_DATAGRAM * 2)
    with udp("127.0.0.1") as sock, udp("127.0.0.1") as peer:
        good = struct.pack("=H", socket.AF_INET) + struct.pack(
            "!H", peer.getsockname()[1]) + socket.inet_aton("127.0.0.1") + bytes(8)
        # No SO_BROADCAST: the kernel refuses a broadcast destination (EACCES).
        bad = good[:4] + socket.inet_aton("255.255.255.255") + bytes(8)
        for name in (good, bad, good):
            sender.space()[:3] = b"abc"
            sender.push(3, mmsg.bytes_address(name), len(name), 0, 0)

        assert sender.flush(sock.fileno()) == (2, 6, 1)
        wait_readable(peer)
        assert peer.recv(10) == b"abc" and peer.recv(10) == b"abc"


def test_a_sender_needs_room_for_a_whole_datagram() -> None:
    with pytest.raises(ValueError, match="64 KiB"):
        mmsg.Sender(4, 1024)
