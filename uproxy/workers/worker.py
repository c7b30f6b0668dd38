"""A worker process of `--workers N`: serves the listeners the control
process hands it, with a Balancer of its own fed by the control process's
messages, and reports its counters back. Started by the supervisor as
`python -m uproxy.workers.worker`, not by people.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from uproxy.balancer import Balancer
from uproxy.eventloop import install_uvloop
from uproxy.model import ServicePortName
from uproxy.relay.server import Server
from uproxy.relay.tcp import TcpServer
from uproxy.relay.udp import UdpServer
from uproxy.stats import PortStats
from uproxy.workers.channel import Channel
from uproxy.workers.messages import (
    NUMBERS,
    Abort,
    Close,
    Forget,
    Message,
    Open,
    PortReport,
    PortUpdate,
    Stats,
    Stop,
    WorkerConfig,
)
from uproxy.workers.supervisor import REPORT_INTERVAL

log = logging.getLogger("uproxy.workers")


@dataclass
class _Served:
    name: ServicePortName
    server: Server
    stats: PortStats
    closed: bool = False

    @property
    def open(self) -> int:
        return self.server.open_connections


class Worker:
    """One worker process's state: a Balancer and the listeners it serves."""

    def __init__(self, index: int, config: WorkerConfig,
                 access_log: Callable[[dict[str, object]], None] | None = None) -> None:
        self.index = index
        self.config = config
        self.access_log = access_log
        self.balancer = Balancer()
        self.served: dict[int, _Served] = {}
        self.channel: Channel | None = None
        self.stop_requested = asyncio.Event()
        self.grace = config.grace
        self._sent: dict[int, tuple[Any, ...]] = {}

    def on_message(self, message: Message, fds: list[int]) -> None:
        if isinstance(message, PortUpdate):
            self.balancer.update(message.name, message.endpoints, message.affinity,
                                 external_endpoints=message.external,
                                 cluster_ips=message.cluster_ips)
        elif isinstance(message, Forget):
            self.balancer.remove(message.name)
        elif isinstance(message, Open) and fds:
            self._open(message, fds[0])
            fds = fds[1:]
        elif isinstance(message, Close):
            self._close(message.listener_id)
        elif isinstance(message, Abort):
            served = self.served.get(message.listener_id)
            if served is not None:
                served.closed = True
                served.server.abort()
        elif isinstance(message, Stop):
            self.grace = message.grace
            self.stop_requested.set()
        for fd in fds:
            os.close(fd)

    def _open(self, message: Open, fd: int) -> None:
        listener_id, name = message.listener_id, message.name
        old = self.served.pop(listener_id, None)
        if old is not None:  # a resend; keep one socket per listener
            old.server.abort()
        sock = socket.socket(fileno=fd)
        stats = PortStats()
        picker = self.balancer.picker(name, stats)
        server: Server
        if message.protocol == "TCP":
            server = TcpServer(sock, picker, stats, mode=self.config.relay_mode,
                               name=str(name), access_log=self.access_log,
                               proxy_protocol=message.proxy_protocol)
        else:
            server = UdpServer(sock, picker, stats,
                               session_timeout=self.config.udp_timeout,
                               max_sessions=self.config.udp_max_sessions, name=str(name))
        server.start()
        self.served[listener_id] = _Served(name, server, stats)

    def _close(self, listener_id: int) -> None:
        served = self.served.get(listener_id)
        if served is None or served.closed:
            return
        served.closed = True
        if served.server.protocol == "UDP":
            served.server.abort()  # as the single-process pool does: frees IP:port at once
        else:
            served.server.stop_accepting()

    @property
    def open_connections(self) -> int:
        return sum(served.open for served in self.served.values())

    def report(self) -> None:
        """Send the counters of ports that changed; forget closed, idle ones."""
        ports: dict[int, PortReport] = {}
        for listener_id, served in list(self.served.items()):
            stats = served.stats
            numbers = tuple(float(getattr(stats, attribute)) for attribute in NUMBERS)
            signature = (*numbers, len(stats.picks), sum(stats.picks.values()))
            if signature != self._sent.get(listener_id) or stats.dial_latencies:
                latencies, stats.dial_latencies = tuple(stats.dial_latencies), []
                ports[listener_id] = PortReport(numbers, dict(stats.picks), latencies)
                self._sent[listener_id] = signature
            if served.closed and not served.open:
                del self.served[listener_id]
                self._sent.pop(listener_id, None)
        if ports and self.channel is not None:
            self.channel.send(Stats(ports))

    async def report_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.report()
            self.balancer.expire_pins()

    async def shutdown(self) -> None:
        for listener_id in list(self.served):
            self._close(listener_id)
        servers = [served.server for served in self.served.values()]
        if self.open_connections:
            log.info("worker %d: draining %d open connections for up to %.1fs",
                     self.index, self.open_connections, self.grace)
            await asyncio.gather(*(server.drain(self.grace) for server in servers))
        for server in servers:
            server.abort()
        self.report()


async def _run_worker(index: int, channel_fd: int, config: WorkerConfig) -> None:
    from uproxy.logs import AccessLog

    loop = asyncio.get_running_loop()
    access_log = AccessLog() if config.verbose >= 1 else None
    worker = Worker(index, config, access_log)
    channel = Channel(socket.socket(fileno=channel_fd), worker.on_message,
                      worker.stop_requested.set)  # the control process went away
    worker.channel = channel
    loop.add_signal_handler(signal.SIGTERM, worker.stop_requested.set)
    helpers = [asyncio.ensure_future(worker.report_every(REPORT_INTERVAL))]
    if access_log is not None:
        helpers.append(asyncio.ensure_future(access_log.run()))
    try:
        await worker.stop_requested.wait()
        await worker.shutdown()
        await channel.flushed(1.0)
    finally:
        for helper in helpers:
            helper.cancel()
        if access_log is not None:
            access_log.flush()
        channel.close()


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a worker process (started by WorkerGroup, not by people)."""
    parser = argparse.ArgumentParser(prog="uproxy-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    config = WorkerConfig.from_json(args.config)

    from uproxy.logs import setup_logging

    setup_logging("json" if config.log_format == "json" else "text", config.verbose)
    # Ctrl-C and a hang-up reach the whole process group; the control process
    # orders the shutdown and owns reloading.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    install_uvloop()
    asyncio.run(_run_worker(args.index, args.channel_fd, config))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
