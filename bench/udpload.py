"""UDP request/response load for S4: an echo backend and a closed-loop client.

    udpload.py echo HOST PORT
    udpload.py client HOST PORT --clients N --duration S [--warmup S]

The client keeps one 64-byte datagram in flight per client socket (its own
source port, like separate clients); a reply is timed and answered with the
next request. A request unanswered for 200 ms counts as lost and is resent.
It prints one JSON object: replies, seconds, lost, and latency samples (ms).
Run several client processes so the load generator is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time

PADDING = b"x" * 56  # + an 8-byte sequence number = 64 bytes
MAX_SAMPLES = 20_000
LOSS_TIMEOUT = 0.2


def echo(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    buf = bytearray(65536)
    view = memoryview(buf)
    recvfrom_into, sendto = sock.recvfrom_into, sock.sendto
    while True:
        n, addr = recvfrom_into(buf)
        sendto(view[:n], addr)


class Client(asyncio.DatagramProtocol):
    """One request in flight; a late reply to a resent request is ignored (stale)."""

    __slots__ = ("gen", "sent_at", "seq", "tag", "transport")

    def __init__(self, gen: Load) -> None:
        self.gen = gen
        self.sent_at = 0.0
        self.seq = 0
        self.tag = b""
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        self.seq += 1
        self.tag = struct.pack("!Q", self.seq)
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.sendto(self.tag + PADDING)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if data[:8] != self.tag:
            self.gen.stale += 1
            return
        now = time.perf_counter()
        self.gen.record(now - self.sent_at, now)
        if self.gen.running:
            self.send()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable while the proxy starts: the loss timer resends


class Load:
    def __init__(self, warmup_until: float, stop_at: float) -> None:
        self.warmup_until = warmup_until
        self.stop_at = stop_at
        self.running = True
        self.replies = 0
        self.stale = 0
        self.samples: list[float] = []
        self.stride = 1
        self.seen = 0

    def record(self, latency: float, now: float) -> None:
        if now < self.warmup_until or now > self.stop_at:
            return
        self.replies += 1
        self.seen += 1
        if self.seen % self.stride == 0:
            self.samples.append(latency * 1000.0)
            if len(self.samples) >= MAX_SAMPLES:  # keep every other one, halve the rate
                self.samples = self.samples[::2]
                self.stride *= 2


async def client(host: str, port: int, clients: int, duration: float, warmup: float) -> None:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    gen = Load(start + warmup, start + warmup + duration)
    protocols: list[Client] = []
    for _ in range(clients):
        _, proto = await loop.create_datagram_endpoint(
            lambda: Client(gen), remote_addr=(host, port))
        protocols.append(proto)
    lost = 0
    while time.perf_counter() < gen.stop_at:
        await asyncio.sleep(0.05)
        now = time.perf_counter()
        for proto in protocols:
            if now - proto.sent_at > LOSS_TIMEOUT:
                lost += 1
                proto.send()
    gen.running = False
    for proto in protocols:
        if proto.transport is not None:
            proto.transport.close()
    json.dump({"replies": gen.replies, "seconds": duration, "lost": lost, "stale": gen.stale,
               "samples_ms": [round(s, 4) for s in gen.samples]}, sys.stdout)
    sys.stdout.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["echo", "client"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    args = parser.parse_args()
    if args.mode == "echo":
        echo(args.host, args.port)
        return
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(client(args.host, args.port, args.clients, args.duration, args.warmup))


if __name__ == "__main__":
    main()
