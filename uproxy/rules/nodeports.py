"""Holding node ports: a bound socket per (protocol, node port).

A NodePort rule only catches packets; without a socket on the port another
program could bind it and never see its traffic. kube-proxy held such
"local ports" for the same reason. The socket is bound, not listening:
nothing is ever accepted on it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from uproxy.rules.base import Portal

Key = tuple[str, int]  # ("TCP" | "UDP", node port)


def _bind(protocol: str, port: int) -> socket.socket:
    kind = socket.SOCK_STREAM if protocol.upper() == "TCP" else socket.SOCK_DGRAM
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple[str, int] = ("::", port)
    except OSError:  # no IPv6 here
        sock = socket.socket(socket.AF_INET, kind)
        address = ("0.0.0.0", port)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class NodePortReservations:
    """Keeps exactly the wanted node ports bound (dual-stack when IPv6 exists)."""

    def __init__(self) -> None:
        self.held: dict[Key, socket.socket] = {}

    def update(self, wanted: Iterable[Key]) -> list[str]:
        """Bind new ports, release gone ones; one message per port that could not be held."""
        keys = {(protocol.upper(), port) for protocol, port in wanted}
        for key in sorted(set(self.held) - keys):
            self.held.pop(key).close()
        problems = []
        for key in sorted(keys - set(self.held)):
            try:
                self.held[key] = _bind(*key)
            except OSError as error:
                problems.append(f"node port {key[1]}/{key[0]}: cannot hold it: {error.strerror}")
        return problems

    def close(self) -> None:
        self.update(())


def node_ports(portals: Iterable[Portal]) -> set[Key]:
    """(protocol, node port) of every portal that has a node port."""
    keys: set[Key] = set()
    for portal in portals:
        if portal.frontend.node_port:
            keys.add((portal.frontend.protocol.upper(), portal.frontend.node_port))
    return keys
