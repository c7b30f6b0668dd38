"""Node port reservations (a held socket per node port) and choosing a backend."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess

import pytest

from uproxy.model import Frontend, ServicePortName
from uproxy.rules.base import NoRules, Portal, RulesError
from uproxy.rules.iptables import IptablesRules
from uproxy.rules.nft import NftRules
from uproxy.rules.nodeports import NodePortReservations, node_ports
from uproxy.rules.select import make_rules


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bind_error(kind: socket.SocketKind, port: int) -> int | None:
    """errno of binding 0.0.0.0:port, or None when it binds."""
    with socket.socket(socket.AF_INET, kind) as other:
        try:
            other.bind(("0.0.0.0", port))
        except OSError as error:
            return error.errno
    return None


def test_a_held_node_port_cannot_be_bound_until_it_is_gone() -> None:
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    reservations = NodePortReservations()
    try:
        assert reservations.update([("tcp", tcp), ("UDP", udp)]) == []
        assert set(reservations.held) == {("TCP", tcp), ("UDP", udp)}
        assert bind_error(socket.SOCK_STREAM, tcp) == errno.EADDRINUSE
        assert bind_error(socket.SOCK_DGRAM, udp) == errno.EADDRINUSE

        # Same set again: the very same sockets stay.
        before = dict(reservations.held)
        assert reservations.update([("TCP", tcp), ("UDP", udp)]) == []
        assert reservations.held == before

        # The UDP port goes: released at once, the TCP one stays held.
        assert reservations.update([("TCP", tcp)]) == []
        assert bind_error(socket.SOCK_DGRAM, udp) is None
        assert bind_error(socket.SOCK_STREAM, tcp) == errno.EADDRINUSE
    finally:
        reservations.close()
    assert reservations.held == {}
    assert bind_error(socket.SOCK_STREAM, tcp) is None


def test_a_port_someone_else_holds_is_reported_in_one_line_and_retried() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("0.0.0.0", 0))
        port = squatter.getsockname()[1]
        reservations = NodePortReservations()
        problems = reservations.update([("TCP", port)])
        assert problems == [f"node port {port}/TCP: cannot hold it: Address already in use"]
        assert reservations.held == {}
    # The squatter left: the next update holds it.
    try:
        assert reservations.update([("TCP", port)]) == []
        assert ("TCP", port) in reservations.held
    finally:
        reservations.close()


def test_node_ports_of_portals() -> None:
    def portal(name: str, protocol: str, node_port: int | None) -> Portal:
        frontend = Frontend(ServicePortName("default", name, "p", protocol), 80, protocol,
                            cluster_ips=("198.18.1.1",), node_port=node_port)
        return Portal(frontend, "0.0.0.0", 40000)

    portals = [portal("a", "TCP", 30080), portal("b", "UDP", 30053), portal("c", "TCP", None)]
    assert node_ports(portals) == {("TCP", 30080), ("UDP", 30053)}


@pytest.mark.parametrize(("kind", "laptop", "made", "name"), [
    ("auto", False, IptablesRules, "iptables"),
    ("auto", True, NoRules, "none"),
    ("iptables", False, IptablesRules, "iptables"),
    ("nft", False, NftRules, "nft"),
    ("none", False, NoRules, "none"),
])
def test_make_rules_choices(kind: str, laptop: bool, made: type, name: str) -> None:
    rules = make_rules(kind, "UPROXY", laptop_mode=laptop)
    assert isinstance(rules, made)
    assert rules.name == name


def test_make_rules_refuses_unknown_kinds_and_prefixes() -> None:
    with pytest.raises(ValueError, match="--rules 'ipvs': choose one of auto, iptables, nft"):
        make_rules("ipvs", "UPROXY", laptop_mode=False)
    with pytest.raises(ValueError, match="--chain-prefix 'NO-DASHES'"):
        make_rules("iptables", "NO-DASHES", laptop_mode=False)


def test_iptc_is_refused_on_an_nf_tables_host_with_what_to_use() -> None:
    if shutil.which("iptables") is None:
        pytest.skip("needs the iptables command to tell the variant")
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True,
                             check=False).stdout
    if "nf_tables" not in version:
        pytest.skip(f"legacy host ({version.strip()}): iptc is allowed here")
    with pytest.raises(RulesError) as refused:
        make_rules("iptc", "UPROXY", laptop_mode=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("--rules iptc: this host's iptables is the nf_tables variant")
    assert message.endswith("use --rules iptables or nft")
