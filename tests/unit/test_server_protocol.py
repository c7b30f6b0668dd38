"""Every listener's server is a relay.server.Server: what the pool and a worker
hold, whatever serves the socket."""

from __future__ import annotations

import socket

from uproxy.model import Endpoint, ServicePortName
from uproxy.picking import TrafficSplit
from uproxy.relay.server import Server
from uproxy.relay.tcp import TcpServer
from uproxy.relay.udp import UdpServer
from uproxy.settings import ListenerSettings, Settings
from uproxy.stats import PortStats
from uproxy.workers.supervisor import SharedServer, WorkerGroup

NAME = ServicePortName("default", "web", "", "TCP")


class Picker:
    split = TrafficSplit()

    def pick(self, client_ip: str, reset_affinity: bool = False) -> Endpoint:
        return Endpoint("127.0.0.1", 9)

    pick_external = pick


def test_tcp_udp_and_shared_servers_are_servers() -> None:
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        udp.bind(("127.0.0.1", 0))
        group = WorkerGroup(Settings(listeners=ListenerSettings(workers=2)))
        servers = [TcpServer(tcp, Picker(), PortStats()),
                   UdpServer(udp, Picker(), PortStats()),
                   SharedServer(group, 1, NAME, "TCP", [tcp], PortStats())]
        for server in servers:
            assert isinstance(server, Server), type(server).__name__
            assert server.open_connections == 0
        assert [s.protocol for s in servers] == ["TCP", "UDP", "TCP"]
