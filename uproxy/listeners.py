"""The listener pool: one listening socket per (service, port, protocol).

In rules mode a listener binds `--bind-address` on a proxy port from
`--proxy-port-range` (or one the OS picks) and kernel rules steer the
service's traffic to it. In laptop mode (`--bind-range`) every service gets
its own IP from the range and listens on `IP:servicePort` directly.

A port that cannot be bound is recorded in `errors` and left out; the other
listeners keep working.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from uproxy.allocators import AddressAllocator, ExhaustedError, PortAllocator
from uproxy.model import DesiredPort, Frontend, ServicePortName, format_hostport
from uproxy.picking import Picker
from uproxy.portforward.connection import Relay
from uproxy.relay.server import Server
from uproxy.relay.tcp import TcpServer
from uproxy.relay.udp import UdpServer
from uproxy.settings import ListenerSettings
from uproxy.stats import PortStats

log = logging.getLogger("uproxy.listeners")

IP_FREEBIND = 15  # Linux; lets laptop mode bind range addresses not yet on an interface
BIND_ATTEMPTS = 16  # proxy ports tried before a port is reported as not served
UDP_NOT_FORWARDED = "UDP cannot cross port-forward"
AccessLog = Callable[[dict[str, object]], None]


# (name, protocol, bound socket, picker, stats) -> the server that runs it
ServerFactory = Callable[[Frontend, socket.socket, Picker, PortStats], Server]


class BindError(Exception):
    """A listener could not be opened; the message names the address and why."""


@dataclass(slots=True)
class Listener:
    name: ServicePortName
    protocol: str
    ip: str
    port: int
    server: Server

    @property
    def address(self) -> str:
        return format_hostport(self.ip, self.port)


def open_socket(protocol: str, ip: str, port: int, *, freebind: bool = False,
                reuseport: bool = False) -> socket.socket:
    """A bound (and for TCP listening) non-blocking socket."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "TCP" else socket.SOCK_DGRAM
    # Non-blocking from birth: no fcntl pair after bind (10k listeners a sync).
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)
    try:
        if protocol == "TCP":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip == "::" else 1)
        if freebind:
            level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
            sock.setsockopt(level, IP_FREEBIND, 1)
        sock.bind((ip, port))
        if protocol == "TCP":
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenerPool:
    def __init__(
        self,
        settings: ListenerSettings,
        make_picker: Callable[[ServicePortName, PortStats], Picker],
        *,
        access_log: AccessLog | None = None,
        make_server: ServerFactory | None = None,
        forward: Relay | None = None,
    ) -> None:
        self.settings = settings
        # --dial portforward|auto: how TCP listeners reach endpoints behind port-forward.
        self._forward = forward
        self._make_picker = make_picker
        self._access_log = access_log
        # --workers: a factory serving each bound socket with SO_REUSEPORT siblings.
        self._make_server = make_server
        self._reuseport = make_server is not None
        self.listeners: dict[ServicePortName, Listener] = {}
        # (IP, port) of each listener, kept with `listeners`: read on every sync
        # and every table row, it must not be rebuilt each time.
        self._bound: dict[ServicePortName, tuple[str, int]] = {}
        self.errors: dict[ServicePortName, str] = {}
        self.stats: dict[ServicePortName, PortStats] = {}
        self._retiring: list[Server] = []
        self._ports = (
            PortAllocator(settings.proxy_port_range) if settings.proxy_port_range else None
        )
        self._addresses = (
            AddressAllocator(settings.bind_range) if settings.bind_range is not None else None
        )

    # -- what the proxier reads (uproxy.applying.Listeners) --------------------

    @property
    def laptop_mode(self) -> bool:
        return self.settings.laptop_mode

    @property
    def bound(self) -> Mapping[ServicePortName, tuple[str, int]]:
        return self._bound

    @property
    def unserved(self) -> Mapping[ServicePortName, str]:
        return self.errors

    # -- opening -------------------------------------------------------------

    def _bind_ip(self, port: DesiredPort) -> str:
        if self._addresses is not None:
            return self._addresses.allocate(port.name.service)
        bind = self.settings.bind_address
        wants_v6 = any(":" in ip for ip in port.frontend.addresses)
        if wants_v6 and bind == "0.0.0.0":
            return "::"  # dual-stack socket: IPv4 and IPv6 portals reach it
        return bind

    def _bind(self, port: DesiredPort, ip: str) -> socket.socket:
        protocol = port.frontend.protocol
        if self._addresses is not None:
            return open_socket(protocol, ip, port.frontend.port, freebind=True,
                               reuseport=self._reuseport)
        if self._ports is None:
            return open_socket(protocol, ip, 0, reuseport=self._reuseport)
        tried: set[int] = set()
        for _ in range(BIND_ATTEMPTS):
            number = self._ports.allocate(frozenset(tried))
            try:
                return open_socket(protocol, ip, number, reuseport=self._reuseport)
            except OSError as error:
                self._ports.release(number)
                if error.errno != errno.EADDRINUSE:
                    raise
                tried.add(number)
        raise BindError(
            f"{port.name} {protocol}: {BIND_ATTEMPTS} ports of --proxy-port-range "
            f"{self._ports.range} were in use by other programs"
        )

    def open(self, port: DesiredPort) -> bool:
        """Open and start the listener for a service port; False (and an entry
        in `errors`) when it cannot be bound."""
        name = port.name
        protocol = port.frontend.protocol
        if protocol == "UDP" and self.settings.dial == "portforward":
            # Kubernetes' port-forward carries TCP only.
            self._failed(name, UDP_NOT_FORWARDED, quiet=True)
            return False
        try:
            ip = self._bind_ip(port)
            sock = self._bind(port, ip)
        except ExhaustedError as error:
            self._failed(name, f"{name} {protocol}: {error}")
            return False
        except BindError as error:
            self._failed(name, str(error))
            return False
        except OSError as error:
            where = ip if self._addresses is None else format_hostport(ip, port.frontend.port)
            hint = ""
            if error.errno == errno.EACCES and port.frontend.port < 1024:
                hint = (" (ports below 1024 need root, CAP_NET_BIND_SERVICE or a lower "
                        "net.ipv4.ip_unprivileged_port_start)")
            self._failed(name, f"{name} {protocol}: cannot bind {where}: {error.strerror}{hint}")
            return False
        if self._addresses is not None:  # laptop mode binds the service's own port
            bound_ip, bound_port = ip, port.frontend.port
        else:  # the OS or the range picked the port
            bound_ip, bound_port = sock.getsockname()[:2]
        stats = self.stats.setdefault(name, PortStats())
        picker = self._make_picker(name, stats)
        server: Server
        if self._make_server is not None:
            try:
                server = self._make_server(port.frontend, sock, picker, stats)
            except OSError as error:
                sock.close()
                if self._ports is not None:
                    self._ports.release(bound_port)
                where = format_hostport(bound_ip, bound_port)
                self._failed(name, f"{name} {protocol}: cannot share {where} between workers: "
                                   f"{error.strerror or error}")
                return False
        elif protocol == "TCP":
            server = TcpServer(
                sock, picker, stats, mode=self.settings.relay_mode, name=str(name),
                access_log=self._access_log, forward=self._forward,
                proxy_protocol=port.frontend.proxy_protocol,
            )
        else:
            server = UdpServer(
                sock, picker, stats, session_timeout=self.settings.udp_timeout,
                max_sessions=self.settings.udp_max_sessions, name=str(name),
            )
        server.start()
        listener = Listener(name, protocol, bound_ip, bound_port, server)
        self.listeners[name] = listener
        self._bound[name] = (bound_ip, bound_port)
        if self.errors.pop(name, None) is not None:
            log.info("%s %s: now served on %s", name, protocol, listener.address)
        return True

    def _failed(self, name: ServicePortName, message: str, *, quiet: bool = False) -> None:
        if self.errors.get(name) != message and not quiet:
            log.error("%s (not served)", message)
        self.errors[name] = message

    # -- closing -------------------------------------------------------------

    def close(self, name: ServicePortName) -> None:
        """Close a service port's listener: new connections are refused, open
        ones run on until they end or shutdown drains them."""
        self.errors.pop(name, None)
        listener = self.detach(name)
        if listener is not None:
            self.retire(listener)

    def detach(self, name: ServicePortName) -> Listener | None:
        """Take a listener out of the pool without closing it, so a replacement
        (same service port, new frontend) can open before it closes."""
        self._bound.pop(name, None)
        return self.listeners.pop(name, None)

    def retire(self, listener: Listener) -> None:
        if listener.protocol == "UDP":
            # UDP has no connections to let finish; closing now frees IP:port
            # for a service that comes back at once.
            listener.server.abort()
        else:
            listener.server.stop_accepting()
        if self._ports is not None:
            self._ports.release(listener.port)
        if self._addresses is not None:
            service = listener.name.service
            if not any(other.service == service for other in self.listeners):
                self._addresses.release(service)
        self._retiring = [s for s in self._retiring if _busy(s)]
        self._retiring.append(listener.server)

    def forget(self, name: ServicePortName) -> None:
        """A service port is gone for good: its counters and why it was not served."""
        self.stats.pop(name, None)
        self.errors.pop(name, None)

    # -- shutdown ------------------------------------------------------------

    def stop_accepting(self) -> None:
        for listener in self.listeners.values():
            listener.server.stop_accepting()
            self._retiring.append(listener.server)
        self.listeners.clear()
        self._bound.clear()

    @property
    def open_connections(self) -> int:
        return sum(_open(server) for server in self._all_servers())

    def open_by_protocol(self) -> dict[str, int]:
        """Open TCP connections and UDP sessions, of every listener and retiring server."""
        counts = {"TCP": 0, "UDP": 0}
        for server in self._all_servers():
            counts[server.protocol] += _open(server)
        return counts

    def _all_servers(self) -> list[Server]:
        return [listener.server for listener in self.listeners.values()] + self._retiring

    async def drain(self, timeout: float) -> None:
        servers = self._all_servers()
        if servers:
            await asyncio.gather(*(server.drain(timeout) for server in servers))

    def abort(self) -> None:
        for server in self._all_servers():
            server.abort()
        self._retiring.clear()


def _open(server: Server) -> int:
    return server.open_connections


def _busy(server: Server) -> bool:
    return _open(server) > 0
