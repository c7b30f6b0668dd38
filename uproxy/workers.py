"""`--workers N`: one control process, N worker processes serving connections.

The control process keeps everything that decides (source, tracker, sync
runner, Proxier, rules, web servers, the listener pool with its port and IP
allocators). Workers only move bytes:

- Every listener is N sockets with SO_REUSEPORT on one address, bound by the
  control process (so bind errors and allocation stay where they were). A
  classic-BPF program (uproxy.reuseport) picks the socket from the client's
  source IP, so one client always reaches one worker and ClientIP affinity,
  kept per worker, holds. Socket i goes to worker i over a Unix socketpair
  (SCM_RIGHTS). The control process keeps its own copy of every socket: a
  worker that dies leaves its socket open (queued connections wait instead
  of being reset, and the kernel's numbering of the group does not shift)
  until the restarted worker gets it again.
- The plan reaches workers as messages on the same socketpair: per service
  port its endpoints and affinity timeout, and when external traffic has its
  own endpoints those and the cluster IPs (`port`, `forget`), and per
  listener which socket serves it (`open`, `close`, `abort`); `stop` drains
  and exits. Workers keep their own Balancer.
- Workers send their counters back every second (only ports that changed)
  and when they exit; the control process adds the differences into the
  pool's PortStats, so /metrics and /status show the sums. A worker that dies
  takes its open connections with it: its share of the active gauges is
  taken back out.

Messages are length-prefixed JSON frames, `!IH` (body length, descriptor
count) then the body; a frame's descriptors ride on its first byte, which
Linux delivers with the first read that returns that byte.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from uproxy import reuseport
from uproxy.balancer import Balancer
from uproxy.eventloop import install_uvloop
from uproxy.listeners import IP_FREEBIND, open_socket
from uproxy.model import Endpoint, ServicePortName
from uproxy.picking import Picker
from uproxy.relay.tcp import TcpServer
from uproxy.relay.udp import UdpServer
from uproxy.settings import Settings
from uproxy.stats import PortStats

log = logging.getLogger("uproxy.workers")

Message = dict[str, Any]
REPORT_INTERVAL = 1.0
RESTART_BACKOFF = 1.0  # a worker that dies this soon after starting waits this long
STOP_MARGIN = 3.0  # beyond --shutdown-grace before a worker that will not exit is killed
_HEADER = struct.Struct("!IH")
_READ_SIZE = 256 * 1024
_MAX_FDS = 16

# PortStats numbers reported as one list, in this order.
NUMBERS = tuple(f.name for f in fields(PortStats) if f.name not in ("picks", "dial_latencies"))
GAUGES = ("connections_active", "udp_sessions_active")
_MAX_LATENCIES = 10_000


# -- the channel ---------------------------------------------------------------


class Channel:
    """Framed messages with descriptors over a non-blocking Unix stream socket."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message, list[int]], None],
        on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._on_message = on_message
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self._in = bytearray()
        self._fds: deque[int] = deque()
        self.closed = False
        self._loop.add_reader(self._fd, self._on_readable)

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if self.closed:
            return
        body = json.dumps(message, separators=(",", ":")).encode()
        # Duplicates, so a listener closed before the frame leaves cannot
        # turn the number into someone else's descriptor.
        self._out.append((_HEADER.pack(len(body), len(fds)) + body, [os.dup(fd) for fd in fds]))
        if not self._writing:
            self._flush()

    @property
    def pending(self) -> int:
        return len(self._out)

    async def flushed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._out and not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def until_closed(self, timeout: float) -> None:
        """Wait for the peer's end of file (its last frames read), at most `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._writing = False
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], rights)
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._fd, self._flush)
                return
            except OSError:
                self._lost()
                return
            for fd in fds:
                os.close(fd)
            if sent < len(data):
                self._out[0] = (data[sent:], [])
            else:
                self._out.popleft()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(_READ_SIZE, socket.CMSG_SPACE(_MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    self._fds.extend(received)
            if not data:
                self._lost()
                return
            self._in += data
            self._parse()

    def _parse(self) -> None:
        buffer = self._in
        offset = 0
        while len(buffer) - offset >= _HEADER.size and not self.closed:
            length, count = _HEADER.unpack_from(buffer, offset)
            end = offset + _HEADER.size + length
            if len(buffer) < end:
                break
            message = json.loads(bytes(buffer[offset + _HEADER.size:end]))
            fds = [self._fds.popleft() for _ in range(min(count, len(self._fds)))]
            offset = end
            self._on_message(message, fds)
        del buffer[:offset]

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self._on_closed()


def _name_json(name: ServicePortName) -> list[str]:
    return [name.namespace, name.name, name.port, name.protocol]


def _name_from(value: Sequence[str]) -> ServicePortName:
    return ServicePortName(value[0], value[1], value[2], value[3])


def port_message(
    name: ServicePortName, endpoints: Iterable[Endpoint], affinity_timeout: float | None,
    external_endpoints: Iterable[Endpoint] | None = None, cluster_ips: Sequence[str] = (),
) -> Message:
    message: Message = {"op": "port", "name": _name_json(name),
                        "endpoints": _endpoints_json(endpoints), "affinity": affinity_timeout}
    if external_endpoints is not None:  # externalTrafficPolicy: Local and the like
        message["external"] = _endpoints_json(external_endpoints)
        message["cluster_ips"] = list(cluster_ips)
    return message


def _endpoints_json(endpoints: Iterable[Endpoint]) -> list[list[object]]:
    return [[e.ip, e.port, e.pod] for e in endpoints]


def _endpoints_from(value: Sequence[Sequence[Any]]) -> list[Endpoint]:
    return [Endpoint(ip, int(port), pod) for ip, port, pod in value]


# -- the control side ----------------------------------------------------------


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
        self._publish(port_message(name, endpoints, affinity_timeout,
                                   external_endpoints, cluster_ips))

    def remove(self, name: ServicePortName) -> None:
        super().remove(name)
        self._publish({"op": "forget", "name": _name_json(name)})


@dataclass
class _Reported:
    """What one worker last said about one listener (its cumulative numbers)."""

    numbers: list[float]
    picks: dict[str, int] = field(default_factory=dict)


class SharedServer:
    """A listener served by the workers; what the pool holds in its place."""

    def __init__(self, group: WorkerGroup, listener_id: int, name: ServicePortName,
                 protocol: str, sockets: list[socket.socket], stats: PortStats) -> None:
        self.group = group
        self.id = listener_id
        self.name = name
        self.protocol = protocol
        self.sockets = sockets
        self.stats = stats
        self.accepting = False
        self.reported: dict[int, _Reported] = {}  # worker slot -> last report

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
        self.group.broadcast({"op": "close", "id": self.id})
        self.group.forget_if_idle(self)

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def abort(self) -> None:
        self.stop_accepting()
        self.group.broadcast({"op": "abort", "id": self.id})

    @property
    def open_connections(self) -> int:
        """Connections (TCP) or sessions (UDP) the workers last reported open."""
        active = NUMBERS.index("connections_active")
        sessions = NUMBERS.index("udp_sessions_active")
        return int(sum(r.numbers[active] + r.numbers[sessions] for r in self.reported.values()))

    def merge(self, slot: int, numbers: list[float], picks: dict[str, int],
              latencies: list[float]) -> None:
        """Add what changed since this worker's last report into the pool's stats."""
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

    def worker_gone(self, slot: int) -> None:
        """The worker died with its connections: take its gauges back out."""
        previous = self.reported.pop(slot, None)
        if previous is None:
            return
        for attribute in GAUGES:
            value = previous.numbers[NUMBERS.index(attribute)]
            setattr(self.stats, attribute, getattr(self.stats, attribute) - int(value))


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
                sys.executable, "-m", "uproxy.workers",
                "--index", str(self.index), "--channel-fd", str(child.fileno()),
                "--config", json.dumps(self.group.config),
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
            self.channel.send(port_message(name, view.endpoints, view.affinity_timeout,
                                           view.external_endpoints, view.cluster_ips))
        for server in self.group.servers.values():
            if server.accepting:
                self.send_open(server)

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if self.channel is not None:
            self.channel.send(message, fds)

    def send_open(self, server: SharedServer) -> None:
        try:
            self.send({"op": "open", "id": server.id, "name": _name_json(server.name),
                       "protocol": server.protocol}, [server.sockets[self.index].fileno()])
        except OSError as error:  # out of descriptors for the copy in flight
            log.error("%s %s: worker %d does not serve it: %s", server.name, server.protocol,
                      self.index, error.strerror or error)

    def _on_message(self, message: Message, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if message.get("op") != "stats":
            return
        for key, entry in message["ports"].items():
            server = self.group.servers.get(int(key))
            if server is not None:
                server.merge(self.index, entry["n"], entry.get("p", {}), entry.get("d", []))
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
        self.config: dict[str, Any] = {
            "relay_mode": settings.listeners.relay_mode,
            "udp_timeout": settings.listeners.udp_timeout,
            "udp_max_sessions": settings.listeners.udp_max_sessions,
            "log_format": settings.logs.format,
            "verbose": settings.logs.verbose,
            "grace": settings.shutdown_grace,
        }
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

    def make_server(self, name: ServicePortName, protocol: str, sock: socket.socket,
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
        server = SharedServer(self, self._next_id, name, protocol, sockets, stats)
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
        self.broadcast({"op": "stop", "grace": grace})
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




# -- the worker side -------------------------------------------------------------


@dataclass
class _Served:
    name: ServicePortName
    server: TcpServer | UdpServer
    stats: PortStats
    closed: bool = False

    @property
    def open(self) -> int:
        if isinstance(self.server, UdpServer):
            return self.server.open_sessions
        return self.server.open_connections


class Worker:
    """One worker process's state: a Balancer and the listeners it serves."""

    def __init__(self, index: int, config: dict[str, Any],
                 access_log: Callable[[dict[str, object]], None] | None = None) -> None:
        self.index = index
        self.config = config
        self.access_log = access_log
        self.balancer = Balancer()
        self.served: dict[int, _Served] = {}
        self.channel: Channel | None = None
        self.stop_requested = asyncio.Event()
        self.grace = float(config.get("grace", 10.0))
        self._sent: dict[int, tuple[Any, ...]] = {}

    def on_message(self, message: Message, fds: list[int]) -> None:
        op = message.get("op")
        if op == "port":
            external = message.get("external")
            self.balancer.update(
                _name_from(message["name"]), _endpoints_from(message["endpoints"]),
                message["affinity"],
                external_endpoints=None if external is None else _endpoints_from(external),
                cluster_ips=message.get("cluster_ips", ()),
            )
        elif op == "forget":
            self.balancer.remove(_name_from(message["name"]))
        elif op == "open" and fds:
            self._open(int(message["id"]), _name_from(message["name"]), message["protocol"],
                       fds[0])
            fds = fds[1:]
        elif op == "close":
            self._close(int(message["id"]))
        elif op == "abort":
            served = self.served.get(int(message["id"]))
            if served is not None:
                served.closed = True
                served.server.abort()
        elif op == "stop":
            self.grace = float(message.get("grace", self.grace))
            self.stop_requested.set()
        for fd in fds:
            os.close(fd)

    def _open(self, listener_id: int, name: ServicePortName, protocol: str, fd: int) -> None:
        old = self.served.pop(listener_id, None)
        if old is not None:  # a resend; keep one socket per listener
            old.server.abort()
        sock = socket.socket(fileno=fd)
        stats = PortStats()
        picker = self.balancer.picker(name, stats)
        server: TcpServer | UdpServer
        if protocol == "TCP":
            server = TcpServer(sock, picker, stats, mode=self.config["relay_mode"],
                               name=str(name), access_log=self.access_log)
        else:
            server = UdpServer(sock, picker, stats,
                               session_timeout=float(self.config["udp_timeout"]),
                               max_sessions=int(self.config["udp_max_sessions"]), name=str(name))
        server.start()
        self.served[listener_id] = _Served(name, server, stats)

    def _close(self, listener_id: int) -> None:
        served = self.served.get(listener_id)
        if served is None or served.closed:
            return
        served.closed = True
        if isinstance(served.server, UdpServer):
            served.server.abort()  # as the single-process pool does: frees IP:port at once
        else:
            served.server.stop_accepting()

    @property
    def open_connections(self) -> int:
        return sum(served.open for served in self.served.values())

    def report(self) -> None:
        """Send the counters of ports that changed; forget closed, idle ones."""
        ports: dict[str, Any] = {}
        for listener_id, served in list(self.served.items()):
            stats = served.stats
            numbers = [getattr(stats, attribute) for attribute in NUMBERS]
            signature = (*numbers, len(stats.picks), sum(stats.picks.values()))
            if signature != self._sent.get(listener_id) or stats.dial_latencies:
                entry: dict[str, Any] = {"n": numbers, "p": stats.picks}
                if stats.dial_latencies:
                    entry["d"], stats.dial_latencies = stats.dial_latencies, []
                ports[str(listener_id)] = entry
                self._sent[listener_id] = signature
            if served.closed and not served.open:
                del self.served[listener_id]
                self._sent.pop(listener_id, None)
        if ports and self.channel is not None:
            self.channel.send({"op": "stats", "ports": ports})

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


async def _run_worker(index: int, channel_fd: int, config: dict[str, Any]) -> None:
    from uproxy.logs import AccessLog

    loop = asyncio.get_running_loop()
    access_log = AccessLog() if int(config.get("verbose", 0)) >= 1 else None
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
    config = json.loads(args.config)

    from uproxy.logs import setup_logging

    setup_logging(config.get("log_format", "text"), int(config.get("verbose", 0)))
    # Ctrl-C and a hang-up reach the whole process group; the control process
    # orders the shutdown and owns reloading.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    install_uvloop()
    asyncio.run(_run_worker(args.index, args.channel_fd, config))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
