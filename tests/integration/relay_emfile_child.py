"""Run a TcpServer with few file descriptors, for test_emfile.py.

usage: relay_emfile_child.py ENDPOINT_PORT NOFILE
Prints the proxy port on stdout, logs to stderr, and when stdin closes prints
the port's counters as JSON on stdout and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import sys
from dataclasses import asdict

import uvloop

from uproxy.model import Endpoint
from uproxy.picking import TrafficSplit
from uproxy.relay.tcp import TcpServer
from uproxy.stats import PortStats


class OnePicker:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.split = TrafficSplit()

    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        return self.endpoint

    pick_external = pick


async def main(endpoint_port: int, nofile: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listener.setblocking(False)
    stats = PortStats()
    server = TcpServer(listener, OnePicker(Endpoint("127.0.0.1", endpoint_port)), stats,
                       name="test/emfile:tcp")
    server.start()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    print(listener.getsockname()[1], flush=True)

    stdin_closed: asyncio.Future[None] = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not stdin_closed.done():
            stdin_closed.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await stdin_closed
    loop.remove_reader(sys.stdin.fileno())
    server.stop_accepting()
    server.abort()
    counters = asdict(stats)
    counters.pop("dial_latencies")
    print(json.dumps(counters), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
