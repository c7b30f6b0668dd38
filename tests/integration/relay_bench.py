"""Loopback numbers for the TCP relay modes (a program, not a test).

usage: python tests/integration/relay_bench.py [--bulk-mib 512] [--seconds 3]
       [--modes splice,protocol,auto] [--pipe-size BYTES] [--promote-after BYTES]

Needs iperf3 and wrk. The proxy runs in its own process (uvloop). Bulk: one
iperf3 connection moves N MiB up, then down (-R). Short connections: wrk with
"Connection: close", 32 at a time, against a tiny HTTP endpoint that answers
and closes. A direct run (no proxy) shows what the load generators can do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import uvloop

CHUNK = 1024 * 1024


def proxy_main(mode: str, backend_port: int, pipe_size: int, promote_after: int) -> None:
    from uproxy.model import Endpoint
    from uproxy.picking import TrafficSplit
    from uproxy.relay.splice import PipePool
    from uproxy.relay.tcp import TcpServer
    from uproxy.stats import PortStats

    class Picker:
        split = TrafficSplit()

        def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
            return Endpoint("127.0.0.1", backend_port)

        pick_external = pick

    async def run() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        server = TcpServer(sock, Picker(), PortStats(), mode=mode,
                           pipes=PipePool(pipe_size), promote_after=promote_after)
        server.start()
        print(sock.getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    uvloop.run(run())


def http_backend_main() -> None:
    """A tiny HTTP server that answers and closes: the short-connection endpoint."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(response)  # type: ignore[attr-defined]
            self.transport.close()

    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(
            Answer, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    uvloop.run(run())


def spawn(*argv: str) -> tuple[subprocess.Popen[bytes], int]:
    child = subprocess.Popen([sys.executable, __file__, *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def bulk_mib_per_s(port: int, mib: int, iperf_port: int, reverse: bool) -> float:
    """iperf3 through `port` (which leads to the iperf3 server on iperf_port)."""
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(iperf_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", f"{mib}M", "-J"]
        if reverse:
            argv.append("-R")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
        result = json.loads(out.stdout)
        return float(result["end"]["sum_received"]["bits_per_second"]) / 8 / 2**20
    finally:
        server.wait(10)


def short_conns_per_s(port: int, seconds: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "Connection: close",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=60, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    total = int(re.search(r"(\d+) requests in", out.stdout).group(1))  # type: ignore[union-attr]
    if errors:
        print("   wrk:", errors.group(0), file=sys.stderr)
    return rate, total


def stop(child: subprocess.Popen[bytes]) -> float:
    """End a child; returns the CPU seconds (user + system) it used."""
    assert child.stdin is not None
    child.stdin.close()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def bench(args: argparse.Namespace) -> None:
    http, http_port = spawn("--http")
    iperf_port = free_port()
    # What a proxy process costs with no traffic (interpreter start, imports).
    idle = min(stop(spawn("--proxy", "auto", "1", "65536", "0")[0]) for _ in range(3))
    print(f"{'mode':<10}{'up MiB/s':>10}{'down MiB/s':>11}{'CPU s/GiB':>10}"
          f"{'conn/s':>8}{'CPU us/conn':>12}")
    for mode in ["direct", *args.modes.split(",")]:
        children = []
        if mode == "direct":
            bulk_port, short_port = iperf_port, http_port
        else:
            bulk_child, bulk_port = spawn("--proxy", mode, str(iperf_port), str(args.pipe_size),
                                          str(args.promote_after))
            short_child, short_port = spawn("--proxy", mode, str(http_port),
                                            str(args.pipe_size), str(args.promote_after))
            children = [bulk_child, short_child]
        up = bulk_mib_per_s(bulk_port, args.bulk_mib, iperf_port, reverse=False)
        down = bulk_mib_per_s(bulk_port, args.bulk_mib, iperf_port, reverse=True)
        rate, total = short_conns_per_s(short_port, args.seconds)
        cpu = [stop(child) - idle for child in children] or [float("nan")] * 2
        per_gib = cpu[0] / (2 * args.bulk_mib / 1024)
        per_conn = cpu[1] / total * 1e6
        print(f"{mode:<10}{up:>10.0f}{down:>11.0f}{per_gib:>10.2f}{rate:>8.0f}{per_conn:>12.0f}"
              f"  ({total} conns)", flush=True)
    stop(http)


def main() -> None:
    if sys.argv[1:2] == ["--proxy"]:
        proxy_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    if sys.argv[1:2] == ["--http"]:
        http_backend_main()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--bulk-mib", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=3, help="short-connection run")
    parser.add_argument("--modes", default="splice,protocol,auto")
    parser.add_argument("--pipe-size", type=int, default=256 * 1024)
    parser.add_argument("--promote-after", type=int, default=256 * 1024)
    bench(parser.parse_args())


if __name__ == "__main__":
    main()
