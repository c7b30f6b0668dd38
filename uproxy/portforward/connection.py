"""A client connection relayed through the API server's port-forward.

The listener's server hands over a client whose picked endpoint is reached
through port-forward (`DialRoutes`). Balancing stays the balancer's: a failed
attempt picks again with `reset_affinity`, as a direct dial's failover does,
and every failed attempt counts in `uproxy_dial_failures_total`.

What counts as a failed attempt: the WebSocket refused (403, 404, the API
server unreachable), no answer within the attempt's timeout, or the
kubelet's error message arriving before the pod said anything and before any
of the client's bytes were sent. The client's first bytes wait for that:
until the pod speaks, or the error channel has been quiet for `SETTLE`
seconds (the kubelet's connect to the pod fails within milliseconds when it
fails at once). An error after that ends the connection with a reset.

Half-close: with v5 the client's EOF is passed on as the close signal and
the pod's remaining bytes still arrive. v4 has no way to pass it on: the
stream then stays open for what the pod still sends and ends once the pod
has been quiet for `V4_LINGER` seconds, or closes.

Backpressure both ways: a chunk read from the client is sent before the next
is read (the WebSocket's send waits while its buffer is full); a message
from the pod is written to the client and drained before the next is
received, and a WebSocket nobody reads stops reading its socket. Per
connection that bounds what uproxy holds to a chunk each way plus the
client session's read buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from uproxy.model import Endpoint
from uproxy.picking import NoEndpointsError
from uproxy.portforward.channels import Closed, Data, Event, Failure, ProtocolError
from uproxy.portforward.dialer import Dialer, PortForwardError, Stream

if TYPE_CHECKING:
    from uproxy.dialing import DialRoutes
    from uproxy.stats import PortStats

log = logging.getLogger("uproxy.portforward")

# Per attempt: a WebSocket through a remote API server takes longer than a
# loopback dial, so these are longer than a direct dial's 250 ms .. 2 s; as
# many attempts as a direct dial makes.
PORTFORWARD_TIMEOUTS: tuple[float, ...] = (2.0, 3.0, 5.0, 5.0)
SETTLE = 0.1  # seconds the error channel must stay quiet before client bytes go
V4_LINGER = 5.0  # v4: how long after the client's EOF the pod may stay quiet
CHUNK = 64 * 1024
LOG_EVERY = 10.0  # the same pod failing the same way is logged once per this
_LINGER_RESET = struct.pack("ii", 1, 0)


class Owner(Protocol):
    """What a connection needs from the server it belongs to (relay.tcp.TcpServer)."""

    name: str
    stats: PortStats

    def _closed(self, conn: PortForwardConnection) -> None: ...


class _NotServed(Exception):
    """The attempt failed before anything was sent: another endpoint may serve."""


class Relay:
    """What the failover and the relay share: the dialer, the routes, logging."""

    def __init__(self, dialer: Dialer, routes: DialRoutes,
                 timeouts: Sequence[float] = PORTFORWARD_TIMEOUTS) -> None:
        self.dialer = dialer
        self.routes = routes
        self.timeouts = tuple(timeouts)
        self._logged: dict[tuple[str, str], float] = {}

    def failed(self, service: str, reason: str) -> None:
        """One line per pod and reason, at most every LOG_EVERY seconds."""
        now = time.monotonic()
        key = (service, reason)
        if now - self._logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            if len(self._logged) > 1024:
                self._logged.clear()
            self._logged[key] = now
            log.warning("%s: %s", service, reason)


class PortForwardConnection:
    """One client, relayed to a pod port through port-forward streams."""

    def __init__(self, server: Owner, relay: Relay, client: socket.socket,
                 addr: tuple[object, ...], endpoint: Endpoint,
                 pick: Callable[[str, bool], Endpoint], *, attempt: int = 0,
                 started: float | None = None, header: bytes | None = None) -> None:
        self.server = server
        self.relay = relay
        self.client = client
        self.addr = addr
        self.endpoint = endpoint
        self._pick = pick
        self.attempt = attempt
        self.started = time.monotonic() if started is None else started
        self.dial_seconds = 0.0
        self.outcome = "ok"
        self.header = header  # PROXY protocol: the first bytes every pod gets
        self.moved_in = 0  # client -> pod
        self.moved_out = 0  # pod -> client
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    def bytes_moved(self) -> tuple[int, int]:
        return self.moved_in, self.moved_out

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"portforward {self.server.name} {self.addr[0]}")

    def fail(self, outcome: str) -> None:
        """Abort (shutdown's grace ran out): reset the client."""
        if self.outcome == "ok":
            self.outcome = outcome
        if self._task is not None:
            self._task.cancel()

    # -- the connection's life ----------------------------------------------------

    async def _run(self) -> None:
        stream: Stream | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=self.client, limit=CHUNK)
            self._writer = writer
            stream = await self._dial()
            if stream is None:
                self._reset()
                return
            while True:
                try:
                    await self._relay(reader, writer, stream)
                    break
                except _NotServed as refused:
                    await stream.close()
                    self._stream_closed()
                    stream = None
                    self.server.stats.dial_attempts_failed += 1
                    self.relay.failed(self.server.name, str(refused))
                    stream = await self._dial(next_endpoint=True)
                    if stream is None:
                        self._reset()
                        return
            await self._finish(writer)
        except asyncio.CancelledError:
            self._reset()
        except (ConnectionResetError, ProtocolError) as error:
            if self.outcome == "ok":
                self.outcome = "reset"
            log.debug("%s: %s for %s: %s", self.server.name, self.endpoint.pod, self.addr[0],
                      error)
            self._reset()
        except OSError:
            if self.outcome == "ok":
                self.outcome = "reset"
            self._reset()
        except Exception:  # a bug: say so, and never leave the connection registered
            self.outcome = "error"
            log.exception("%s: port-forward relay for %s failed", self.server.name, self.addr[0])
            self._reset()
        finally:
            if stream is not None:
                await stream.close()
                self._stream_closed()
            self.server._closed(self)

    async def _dial(self, *, next_endpoint: bool = False) -> Stream | None:
        """Open a stream to the endpoint (or the next ones); None when none answered."""
        stats = self.server.stats
        relay = self.relay
        timeouts = relay.timeouts
        if next_endpoint and not self._next():
            return None
        while True:
            pod = self.endpoint.pod
            started = time.monotonic()
            try:
                stream = await relay.dialer.open(pod, self.endpoint.port,
                                                 timeouts[min(self.attempt, len(timeouts) - 1)])
            except PortForwardError as error:
                stats.dial_attempts_failed += 1
                relay.failed(self.server.name, str(error))
                if not error.pod_level:  # no pod fares better: stop here
                    self._gave_up()
                    return None
                if not self._next():
                    return None
                continue
            stats.record_dial(time.monotonic() - started)
            self.dial_seconds = time.monotonic() - self.started
            relay.dialer.streams += 1
            if self.header is not None:
                await stream.send(self.header)
            return stream

    def _next(self) -> bool:
        """Pick again (as a failed direct dial does); False when attempts are used up."""
        self.attempt += 1
        if self.attempt >= len(self.relay.timeouts):
            self._gave_up()
            return False
        try:
            self.endpoint = self._pick(str(self.addr[0]), True)
        except NoEndpointsError:
            self._gave_up()
            return False
        return True

    def _gave_up(self) -> None:
        self.server.stats.connections_failed += 1
        self.outcome = "dial_failed"
        log.info("%s: no endpoint answered for %s after %d attempts (last %s through "
                 "port-forward)", self.server.name, self.addr[0], self.attempt, self.endpoint.pod)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     stream: Stream) -> None:
        """Move bytes both ways until both are done; _NotServed when the kubelet
        refused before anything was sent."""
        go = asyncio.Event()  # client bytes may be sent
        settle = asyncio.get_running_loop().call_later(SETTLE, go.set)
        client_done = asyncio.Event()
        sent = [False]

        async def up() -> None:
            await go.wait()
            while data := await reader.read(CHUNK):
                sent[0] = True
                await stream.send(data)
                self.moved_in += len(data)
            client_done.set()
            await stream.close_write()

        async def down() -> None:
            spoke = False
            while True:
                linger = None if stream.half_close or not client_done.is_set() else V4_LINGER
                try:
                    events: list[Event] | None = await stream.receive(linger)
                except TimeoutError:
                    return  # v4: the pod stayed quiet after the client's EOF
                if events is None:
                    return
                for event in events:
                    if isinstance(event, Data):
                        spoke = True
                        go.set()
                        writer.write(event.payload)
                        self.moved_out += len(event.payload)
                        await writer.drain()
                    elif isinstance(event, Failure):
                        if not spoke and not sent[0]:
                            raise _NotServed(f"pod {self.endpoint.pod}: {event.text}")
                        raise ConnectionResetError(f"pod {self.endpoint.pod}: {event.text}")
                    elif isinstance(event, Closed):
                        return

        try:
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(up())
                receiver = tasks.create_task(down())
                # The pod's side has ended: nothing more can reach it.
                receiver.add_done_callback(lambda _: sender.cancel())
        except* _NotServed as group:
            raise group.exceptions[0] from None
        except* (ConnectionResetError, ProtocolError) as group:
            raise group.exceptions[0] from None
        except* OSError as group:
            raise group.exceptions[0] from None
        finally:
            settle.cancel()

    async def _finish(self, writer: asyncio.StreamWriter) -> None:
        """The pod's side ended: FIN to the client after what was written."""
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def _reset(self) -> None:
        """Close the client abortively (RST)."""
        writer = self._writer
        sock = writer.get_extra_info("socket") if writer is not None else self.client
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if writer is not None:
            writer.transport.abort()
        else:
            self.client.close()

    def _stream_closed(self) -> None:
        self.relay.dialer.streams -= 1
