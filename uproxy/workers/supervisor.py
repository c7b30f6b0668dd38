"""The control side of `--workers N`: starts, feeds, supervises and stops the
worker processes, and stands in the listener pool for the listeners they serve.

See `uproxy.workers` for the process model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uproxy import reuseport
from uproxy.balancer import Balancer
from uproxy.listeners import IP_FREEBIND, open_socket
from uproxy.model import Endpoint, Frontend, ServicePortName
from uproxy.picking import Picker
from uproxy.settings import Settings
from uproxy.stats import PortStats
from uproxy.workers.channel import Channel
from uproxy.workers.messages import (
    GAUGES,
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

log = logging.getLogger("uproxy.workers")

REPORT_INTERVAL = 1.0  # how often workers report their counters
RESTART_BACKOFF = 1.0  # a worker that dies this soon after starting waits this long
STOP_MARGIN = 3.0  # beyond --shutdown-grace before a worker that will not exit is killed
_MAX_LATENCIES = 10_000


class WorkerBalancer(Balancer):
    """The control process's Balancer: also tells every worker what changed.

    Workers pick; this copy only holds the endpoints for /status and for a
    restarted worker."""

    def __init__(self, publish: Callable[[Message], None]) -> None:
        super().__init__()
        self._publish = publish

    def update(
        self,
        name: ServicePortName,
        endpoints: Sequence[Endpoint],
        affinity_timeout: float | None,
        *,
        external_endpoints: Sequence[Endpoint] | None = None,
        cluster_ips: Sequence[str] = (),
    ) -> None:
        super().update(name, endpoints, affinity_timeout,
                       external_endpoints=external_endpoints, cluster_ips=cluster_ips)
        self._publish(PortUpdate(name, tuple(endpoints), affinity_timeout,
                                 None if external_endpoints is None
                                 else tuple(external_endpoints), tuple(cluster_ips)))

    def remove(self, name: ServicePortName) -> None:
        super().remove(name)
        self._publish(Forget(name))


@dataclass
class _Reported:
    """What one worker last said about one listener (its cumulative numbers)."""

    numbers: list[float]
    picks: dict[str, int] = field(default_factory=dict)


class SharedServer:
    """A listener served by the workers; what the pool holds in its place."""

    def __init__(self, group: WorkerGroup, listener_id: int, name: ServicePortName,
                 protocol: str, sockets: list[socket.socket], stats: PortStats, *,
                 proxy_protocol: int = 0) -> None:
        self.group = group
        self.proxy_protocol = proxy_protocol
        self.id = listener_id
        self.name = name
        self.protocol = protocol
        self.sockets = sockets
        self.stats = stats
        self.accepting = False
        self.reported: dict[int, _Reported] = {}  # worker slot -> last report
        self._idle = asyncio.Event()  # no connection or session open in any worker
        self._idle.set()

    def start(self) -> None:
        self.accepting = True
        self.group.servers[self.id] = self
        for slot in self.group.slots:
            slot.send_open(self)

    def stop_accepting(self) -> None:
        """New connections are refused (our copies close, workers close theirs);
        open ones run on in the workers."""
        if not self.accepting:
            return
        self.accepting = False
        for sock in self.sockets:
            sock.close()
        self.group.broadcast(Close(self.id))
        self.group.forget_if_idle(self)

    async def drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    def abort(self) -> None:
        self.stop_accepting()
        self.group.broadcast(Abort(self.id))

    @property
    def open_connections(self) -> int:
        """Connections (TCP) or sessions (UDP) the workers last reported open."""
        active = NUMBERS.index("connections_active")
        sessions = NUMBERS.index("udp_sessions_active")
        return int(sum(r.numbers[active] + r.numbers[sessions] for r in self.reported.values()))

    def merge(self, slot: int, report: PortReport) -> None:
        """Add what changed since this worker's last report into the pool's stats."""
        numbers, picks, latencies = report.numbers, report.picks, report.latencies
        previous = self.reported.get(slot)
        stats = self.stats
        for index, attribute in enumerate(NUMBERS):
            delta = numbers[index] - (previous.numbers[index] if previous is not None else 0)
            if delta:
                setattr(stats, attribute, getattr(stats, attribute) + delta)
        old_picks = previous.picks if previous is not None else {}
        for endpoint, count in picks.items():
            delta = count - old_picks.get(endpoint, 0)
            if delta:
                stats.picks[endpoint] = stats.picks.get(endpoint, 0) + delta
        room = _MAX_LATENCIES - len(stats.dial_latencies)
        if room > 0:
            stats.dial_latencies.extend(latencies[:room])
        self.reported[slot] = _Reported(list(numbers), dict(picks))
        self._check_idle()

    def _check_idle(self) -> None:
        if self.open_connections:
            self._idle.clear()
        else:
            self._idle.set()

    def worker_gone(self, slot: int) -> None:
        """The worker died with its connections: take its gauges back out."""
        previous = self.reported.pop(slot, None)
        if previous is None:
            return
        for attribute in GAUGES:
            value = previous.numbers[NUMBERS.index(attribute)]
            setattr(self.stats, attribute, getattr(self.stats, attribute) - int(value))
        self._check_idle()


class _Slot:
    """One worker position: its process (restarted when it dies) and channel."""

    def __init__(self, group: WorkerGroup, index: int) -> None:
        self.group = group
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.started = 0.0
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "uproxy.workers.worker",
                "--index", str(self.index), "--channel-fd", str(child.fileno()),
                "--config", self.group.config.to_json(),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.started = time.monotonic()
        self.channel = Channel(parent, self._on_message)
        # Endpoints first, so no listener serves before it knows where to send.
        for name in self.group.balancer.names():
            view = self.group.balancer.snapshot(name)
            self.channel.send(PortUpdate(name, view.endpoints, view.affinity_timeout,
                                         view.external_endpoints, view.cluster_ips))
        for server in self.group.servers.values():
            if server.accepting:
                self.send_open(server)

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if self.channel is not None:
            self.channel.send(message, fds)

    def send_open(self, server: SharedServer) -> None:
        try:
            self.send(Open(server.id, server.name, server.protocol, server.proxy_protocol),
                      [server.sockets[self.index].fileno()])
        except OSError as error:  # out of descriptors for the copy in flight
            log.error("%s %s: worker %d does not serve it: %s", server.name, server.protocol,
                      self.index, error.strerror or error)

    def _on_message(self, message: Message, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if not isinstance(message, Stats):
            return
        for listener_id, report in message.ports.items():
            server = self.group.servers.get(listener_id)
            if server is not None:
                server.merge(self.index, report)
        self.group.sweep()

    async def gone(self) -> None:
        """The process exited: read its last report, then take back its gauges."""
        if self.channel is not None:
            await self.channel.until_closed(0.5)
            self.channel.close()
            self.channel = None
        for server in list(self.group.servers.values()):
            server.worker_gone(self.index)
            self.group.forget_if_idle(server)


class WorkerGroup:
    """Owns N worker processes: starts, feeds, supervises and stops them."""

    def __init__(self, settings: Settings) -> None:
        self.count = settings.listeners.workers
        self.config = WorkerConfig(
            relay_mode=settings.listeners.relay_mode,
            udp_timeout=settings.listeners.udp_timeout,
            udp_max_sessions=settings.listeners.udp_max_sessions,
            log_format=settings.logs.format,
            verbose=settings.logs.verbose,
            grace=settings.shutdown_grace,
        )
        self.balancer = WorkerBalancer(self.broadcast)
        self.slots = [_Slot(self, index) for index in range(self.count)]
        self.servers: dict[int, SharedServer] = {}
        self.stopping = False
        self._next_id = 1
        self._closing: dict[int, float] = {}  # listener id -> when it stopped accepting

    @property
    def pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.pid is not None]

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    def broadcast(self, message: Message) -> None:
        for slot in self.slots:
            slot.send(message)

    async def start(self) -> None:
        for slot in self.slots:
            await slot.spawn()
        log.info("started %d workers (pids %s)", self.count,
                 ", ".join(str(pid) for pid in self.pids))

    def make_server(self, frontend: Frontend, sock: socket.socket,
                    picker: Picker, stats: PortStats) -> SharedServer:
        """The pool's server factory: `sock` (bound with SO_REUSEPORT) plus
        N-1 siblings on its address, steered by client IP, one per worker."""
        del picker  # workers pick with their own balancers
        sockets = [sock]
        try:
            address = sock.getsockname()
            for _ in range(self.count - 1):
                sockets.append(_sibling(sock, address))
            reuseport.attach(sock, self.count)
        except BaseException:
            for sibling in sockets[1:]:
                sibling.close()
            raise
        server = SharedServer(self, self._next_id, frontend.name, frontend.protocol, sockets,
                              stats, proxy_protocol=frontend.proxy_protocol)
        self._next_id += 1
        return server

    def forget_if_idle(self, server: SharedServer) -> None:
        """Keep a closed listener until its workers reported their last counters."""
        if server.accepting:
            return
        closed_at = self._closing.setdefault(server.id, time.monotonic())
        settled = time.monotonic() - closed_at > 2 * REPORT_INTERVAL
        if not server.open_connections and (settled or self.stopping):
            self.servers.pop(server.id, None)
            self._closing.pop(server.id, None)

    def sweep(self) -> None:
        for listener_id in list(self._closing):
            server = self.servers.get(listener_id)
            if server is None:
                self._closing.pop(listener_id, None)
            else:
                self.forget_if_idle(server)

    async def supervise(self) -> None:
        """Restart workers that die, until `stop`."""
        async with asyncio.TaskGroup() as tasks:
            for slot in self.slots:
                tasks.create_task(self._watch(slot), name=f"worker-{slot.index}")

    async def _watch(self, slot: _Slot) -> None:
        while not self.stopping:
            process = slot.process
            if process is None:
                return
            code = await process.wait()
            if self.stopping:
                return
            await slot.gone()
            how = f"signal {-code}" if code < 0 else f"code {code}"
            if time.monotonic() - slot.started < RESTART_BACKOFF:
                await asyncio.sleep(RESTART_BACKOFF)  # a crash loop costs a second a turn
            while not self.stopping:
                try:
                    await slot.spawn()
                    break
                except OSError as error:
                    log.error("worker %d: cannot start (%s); retrying", slot.index, error)
                    await asyncio.sleep(RESTART_BACKOFF)
            if self.stopping:
                return
            slot.restarts += 1
            log.warning("worker %d (pid %d) exited with %s; restarted as pid %s",
                        slot.index, process.pid, how, slot.pid)

    async def stop(self, grace: float) -> None:
        """Workers stop accepting, drain for up to `grace`, report and exit."""
        self.stopping = True
        self.broadcast(Stop(grace))
        running = [slot for slot in self.slots if slot.process is not None]
        waits = [asyncio.ensure_future(slot.process.wait())  # type: ignore[union-attr]
                 for slot in running]
        if waits:
            _, late = await asyncio.wait(waits, timeout=grace + STOP_MARGIN)
            for slot in running:
                process = slot.process
                if process is not None and process.returncode is None:
                    log.warning("worker %d (pid %d) did not stop; killing it",
                                slot.index, process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late, timeout=2.0)
        for slot in self.slots:
            await slot.gone()
        for server in list(self.servers.values()):
            for sock in server.sockets:
                sock.close()
        self.servers.clear()


def _sibling(first: socket.socket, address: tuple[Any, ...]) -> socket.socket:
    """Another socket on `first`'s address, made the way the pool made `first`."""
    protocol = "TCP" if first.type == socket.SOCK_STREAM else "UDP"
    level = socket.IPPROTO_IPV6 if first.family == socket.AF_INET6 else socket.IPPROTO_IP
    freebind = bool(first.getsockopt(level, IP_FREEBIND))
    return open_socket(protocol, address[0], address[1], freebind=freebind, reuseport=True)
