"""Every rule backend, in real network namespaces, with real packets.

Timeline per backend: a "node" namespace holds a listener on 0.0.0.0:PROXY
and the rules; a "client" namespace, joined by a veth pair, routes the
service ranges through the node. Clients in both reach the listener through
the cluster IP (nat OUTPUT on the node, nat PREROUTING from the client), the
external and load-balancer IPs and the node port. Removing a portal removes
its rules, a hand-flushed chain comes back on the next apply, applying again
or from a fresh process changes nothing, and cleanup leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Netns, require_system
from tests.system.topology import NODE_IP, make_netns, node_and_client, running_server
from uproxy.model import Frontend, ServicePortName
from uproxy.rules.base import Portal, PortalDelta, RulesError
from uproxy.rules.iptables import IptablesRules
from uproxy.rules.nft import NftRules

pytestmark = pytest.mark.system

PREFIX = "UPT"
WEB = Frontend(ServicePortName("default", "web", "http", "TCP"), 80, "TCP",
               cluster_ips=("198.18.1.10",), node_port=30080,
               external_ips=("198.18.2.10",), load_balancer_ips=("198.18.2.20",))
DNS = Frontend(ServicePortName("kube-system", "dns", "dns", "UDP"), 53, "UDP",
               cluster_ips=("198.18.1.53",))
WEB_PORT, DNS_PORT = 40001, 40002
PORTALS = [Portal(WEB, "0.0.0.0", WEB_PORT), Portal(DNS, "0.0.0.0", DNS_PORT)]

SERVER = """
import socket, sys, threading
port = int(sys.argv[1])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port)); t.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port + 1))
def udp():
    while True:
        data, peer = u.recvfrom(2048); u.sendto(b"udp:" + data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = t.accept(); c.sendall(b"tcp:" + c.recv(1024)); c.close()
"""

CLIENT = """
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=2); s.sendall(b"hi")
        print(s.recv(100).decode())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
        s.sendto(b"hi", (host, port)); print(s.recv(100).decode())
except OSError as e:
    print("error", type(e).__name__)
"""

DRIVER = """
import asyncio, json, sys
from uproxy.model import Frontend, ServicePortName
from uproxy.rules.base import Portal, PortalDelta, RulesError
from uproxy.rules.iptc import IptcRules
action, prefix, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
portals = [Portal(Frontend(ServicePortName(*p["name"]), p["port"], p["protocol"],
                           tuple(p["cluster_ips"]), p["node_port"], tuple(p["external_ips"]),
                           tuple(p["load_balancer_ips"])), p["proxy_ip"], p["proxy_port"])
           for p in spec]
rules = IptcRules(prefix, iptables_cmd="iptables-legacy")
asyncio.run(rules.apply(portals) if action == "apply" else rules.cleanup())
"""


def _spec(portals: list[Portal]) -> str:
    out: list[dict[str, Any]] = []
    for p in portals:
        f = p.frontend
        out.append({"name": [f.name.namespace, f.name.name, f.name.port, f.name.protocol],
                    "port": f.port, "protocol": f.protocol, "cluster_ips": f.cluster_ips,
                    "node_port": f.node_port, "external_ips": f.external_ips,
                    "load_balancer_ips": f.load_balancer_ips,
                    "proxy_ip": p.proxy_ip, "proxy_port": p.proxy_port})
    return json.dumps(out)


class Backend:
    """One backend kind pointed at the node namespace; `fresh()` is a new process's view."""

    def __init__(self, kind: str, node: Netns) -> None:
        self.kind = kind
        self.node = node
        self.rules: Any = self.fresh()

    def fresh(self) -> Any:
        prefix = ["ip", "netns", "exec", self.node.name]
        if self.kind == "iptables":
            return IptablesRules(PREFIX, command_prefix=prefix)
        if self.kind == "iptables-legacy":
            return IptablesRules(PREFIX, command_prefix=prefix, legacy=True)
        if self.kind == "nft":
            return NftRules(PREFIX, command_prefix=prefix)
        return None  # iptc: a process inside the namespace per call

    def apply(self, portals: list[Portal], rules: Any = None) -> None:
        rules = rules or self.rules
        if rules is None:
            self.node.run(sys.executable, "-c", DRIVER, "apply", PREFIX, _spec(portals))
        else:
            asyncio.run(rules.apply(portals))

    def cleanup(self) -> None:
        if self.rules is None:
            self.node.run(sys.executable, "-c", DRIVER, "cleanup", PREFIX, "[]")
        else:
            asyncio.run(self.rules.cleanup())

    def dump(self) -> str:
        """What the kernel holds, without counters and timestamps."""
        if self.kind == "nft":
            text = self.node.run("nft", "list", "ruleset").stdout
        else:
            legacy = "-legacy" if self.kind in ("iptables-legacy", "iptc") else ""
            text = (self.node.run(f"iptables{legacy}-save").stdout
                    + self.node.run(f"ip6tables{legacy}-save").stdout)
        return "\n".join(line for line in text.splitlines()
                         if line and not line.startswith("#")) + "\n"

    def hand_flush(self) -> None:
        if self.kind == "nft":
            self.node.run("nft", "flush", "chain", "ip", "upt", "portals_host")
            self.node.run("nft", "flush", "chain", "ip", "upt", "portals_container")
            return
        tool = "iptables-legacy" if self.kind in ("iptables-legacy", "iptc") else "iptables"
        self.node.run(tool, "-t", "nat", "-F", f"{PREFIX}-PORTALS-HOST")
        self.node.run(tool, "-t", "nat", "-F", f"{PREFIX}-PORTALS-CONTAINER")
        self.node.run(tool, "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment",
                      "uproxy upt-portals-host", "-j", f"{PREFIX}-PORTALS-HOST")


@pytest.fixture
def topology() -> Iterator[tuple[Netns, Netns]]:
    require_system("iptables", "nft")
    with node_and_client("b") as (node, client), running_server(node, SERVER, str(WEB_PORT)):
        yield node, client


def talk(ns: Netns, proto: str, host: str, port: int) -> str:
    return ns.run(sys.executable, "-c", CLIENT, proto, host, str(port)).stdout.strip()


def reachable(node: Netns, client: Netns) -> dict[str, str]:
    return {
        "node->vip": talk(node, "tcp", "198.18.1.10", 80),
        "client->vip": talk(client, "tcp", "198.18.1.10", 80),
        "client->external": talk(client, "tcp", "198.18.2.10", 80),
        "client->lb": talk(client, "tcp", "198.18.2.20", 80),
        "client->nodeport": talk(client, "tcp", NODE_IP, 30080),
        "node->nodeport": talk(node, "tcp", NODE_IP, 30080),
        "node->dns": talk(node, "udp", "198.18.1.53", 53),
        "client->dns": talk(client, "udp", "198.18.1.53", 53),
    }


ALL_OK = {
    "node->vip": "tcp:hi", "client->vip": "tcp:hi", "client->external": "tcp:hi",
    "client->lb": "tcp:hi", "client->nodeport": "tcp:hi", "node->nodeport": "tcp:hi",
    "node->dns": "udp:hi", "client->dns": "udp:hi",
}

BACKENDS = ["iptables", "iptables-legacy", "nft", "iptc"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, topology: tuple[Netns, Netns]) -> Backend:
    if request.param in ("iptables-legacy", "iptc"):
        require_system("iptables-legacy-restore")
    return Backend(request.param, topology[0])


def test_portals_reach_the_listener_on_every_path(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    node, client = topology
    assert talk(client, "tcp", "198.18.1.10", 80).startswith("error")  # no rules yet

    backend.apply(PORTALS)

    assert reachable(node, client) == ALL_OK


def test_iptc_installs_the_very_rules_iptables_legacy_writes(
    topology: tuple[Netns, Netns],
) -> None:
    """iptc builds its rules from render's iptables text: the kernel holds
    the same lines whichever of the two wrote them."""
    require_system("iptables-legacy-restore")
    node, _ = topology
    dumps: dict[str, dict[str, list[str]]] = {}
    for kind in ("iptables-legacy", "iptc"):
        backend = Backend(kind, node)
        backend.apply(PORTALS)
        rules: dict[str, list[str]] = {}  # table -> its rules, in order
        table = ""
        for line in backend.dump().splitlines():
            if line.startswith("*"):
                table = line
            elif line.startswith("-A "):
                rules.setdefault(table, []).append(line)
        dumps[kind] = rules
        backend.cleanup()
    iptc_rules = "\n".join(line for lines in dumps["iptc"].values() for line in lines)
    assert "--ctstate DNAT" in iptc_rules and "-j REDIRECT --to-ports" in iptc_rules
    assert dumps["iptc"] == dumps["iptables-legacy"]


def test_removed_portal_goes_and_flushed_chains_come_back(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    node, client = topology
    backend.apply(PORTALS)
    assert "kube-system/dns:dns" in backend.dump()

    backend.apply(PORTALS[:1])
    node.run("conntrack", "-F", check=False)
    assert "kube-system/dns:dns" not in backend.dump()
    assert talk(client, "udp", "198.18.1.53", 53) == "error TimeoutError"
    assert talk(client, "tcp", "198.18.1.10", 80) == "tcp:hi"

    backend.hand_flush()
    node.run("conntrack", "-F", check=False)
    assert talk(node, "tcp", "198.18.1.10", 80).startswith("error")
    backend.apply(PORTALS[:1])
    assert talk(node, "tcp", "198.18.1.10", 80) == "tcp:hi"
    assert talk(client, "tcp", "198.18.1.10", 80) == "tcp:hi"


def test_reapply_and_restart_keep_one_copy_and_cleanup_removes_all(
    backend: Backend,
) -> None:
    backend.apply(PORTALS)
    once = backend.dump()

    backend.apply(PORTALS)
    assert backend.dump() == once
    backend.apply(PORTALS, backend.fresh())  # a new process after kill -9
    assert backend.dump() == once
    if backend.kind != "nft":
        jumps = [line for line in once.splitlines()
                 if line.startswith(("-A PREROUTING", "-A OUTPUT", "-A INPUT"))]
        assert sorted(jumps) == sorted(set(jumps))
        assert len(jumps) == 5  # IPv4 only: no IPv6 portals, so no IPv6 chains

    backend.cleanup()
    assert "upt" not in backend.dump().lower()
    backend.cleanup()  # nothing left: still fine
    assert "upt" not in backend.dump().lower()


def test_rules_change_fast_enough_to_not_matter() -> None:
    """Smoke guard for the benchmark's claim: 100 services apply well under a second."""
    require_system("nft")
    name = f"uproxy-b-{uuid.uuid4().hex[:6]}"
    ns = make_netns(name)
    try:
        rules = NftRules(PREFIX, command_prefix=["ip", "netns", "exec", name])
        portals = [Portal(Frontend(ServicePortName("b", f"s{i}", "p", "TCP"), 80, "TCP",
                                   (f"198.18.{i // 250}.{i % 250 + 1}",)), "0.0.0.0", 40000 + i)
                   for i in range(100)]
        started = time.monotonic()
        asyncio.run(rules.apply(portals))
        assert time.monotonic() - started < 2.0
        listing = ns.run("nft", "list", "map", "ip", "upt", "portal_redirect").stdout
        assert listing.count('comment "b/s') == 100
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_changes_send_only_the_difference_and_a_failure_makes_the_next_apply_verify(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    if backend.kind == "iptc":
        pytest.skip("iptc runs in a process per call here; it has no smaller change to send")
    node, client = topology
    rules = backend.rules

    def sent() -> int:
        return int(rules.transactions if backend.kind == "nft" else rules.restores)

    backend.apply(PORTALS)
    full = backend.dump()
    before = sent()

    # A sync with changes: one small transaction, no kernel read (nft counts reads).
    reads = getattr(rules, "reads", 0)
    # (With the delta the proxier passes: what left, what came.)
    asyncio.run(rules.apply(PORTALS[:1], verify=False, delta=PortalDelta(gone=(PORTALS[1],))))
    assert sent() == before + 1
    assert getattr(rules, "reads", 0) == reads
    assert "kube-system/dns:dns" not in backend.dump()
    asyncio.run(rules.apply(PORTALS[:1], verify=False))  # nothing changed: nothing sent
    asyncio.run(rules.apply(PORTALS[:1], verify=False, delta=PortalDelta()))  # the same
    assert sent() == before + 1
    asyncio.run(rules.apply(PORTALS, verify=False, delta=PortalDelta(new=(PORTALS[1],))))
    assert sorted(backend.dump().splitlines()) == sorted(full.splitlines())
    assert talk(client, "udp", "198.18.1.53", 53) == "udp:hi"

    # Someone else removes our rules; a change built on what we applied fails...
    asyncio.run(backend.fresh().cleanup())
    with pytest.raises(RulesError):
        asyncio.run(rules.apply(PORTALS[:1], verify=False))
    # ...and the next apply, even one that carries changes, reads and repairs.
    asyncio.run(rules.apply(PORTALS, verify=False))
    assert sorted(backend.dump().splitlines()) == sorted(full.splitlines())
    node.run("conntrack", "-F", check=False)
    assert reachable(node, client) == ALL_OK


# A foreign rule per built-in chain, there before uproxy: the nat ones would
# send the web VIP to a dead port if they ran first.
FOREIGN = {
    4: [("nat", "PREROUTING", "-d 198.18.1.10/32 -p tcp -m tcp --dport 80 "
                              "-j DNAT --to-destination 198.18.3.1:9"),
        ("nat", "PREROUTING", "-p tcp -m tcp --dport 9 -j RETURN"),
        ("nat", "OUTPUT", "-d 198.18.1.10/32 -p tcp -m tcp --dport 80 "
                          "-j DNAT --to-destination 127.0.0.1:9"),
        ("nat", "OUTPUT", "-p tcp -m tcp --dport 9 -j RETURN"),
        ("filter", "INPUT", "-p tcp -m tcp --dport 9 -j ACCEPT")],
    6: [("nat", "PREROUTING", "-p tcp -m tcp --dport 9 -j RETURN"),
        ("nat", "OUTPUT", "-p tcp -m tcp --dport 9 -j RETURN"),
        ("filter", "INPUT", "-p tcp -m tcp --dport 9 -j ACCEPT")],
}
WEB6 = Frontend(ServicePortName("default", "web6", "http", "TCP"), 80, "TCP",
                cluster_ips=("fd00:198:18:1::10",), node_port=30081)
DUAL_PORTALS = [*PORTALS, Portal(WEB6, "0.0.0.0", WEB_PORT)]


def xtables(kind: str, family: int) -> str:
    tool = "iptables" if family == 4 else "ip6tables"
    return f"{tool}-legacy" if kind in ("iptables-legacy", "iptc") else tool


def add_foreign_rules(node: Netns, kind: str) -> None:
    # nft: the foreign rules go through iptables-nft, i.e. the ip/ip6 `nat`
    # and `filter` tables with their chains at the standard priorities.
    tool_kind = "iptables" if kind == "nft" else kind
    for family, rules in FOREIGN.items():
        for table, chain, spec in rules:
            node.run(xtables(tool_kind, family), "-t", table, "-A", chain, *spec.split())


def chain_order(node: Netns, kind: str, family: int, table: str, chain: str) -> list[str]:
    """The rules of a built-in chain, in order, as `-S` prints them (without `-A CHAIN`)."""
    listing = node.run(xtables(kind, family), "-t", table, "-S", chain).stdout
    head = f"-A {chain} "
    return [line[len(head):] for line in listing.splitlines() if line.startswith(head)]


def jump_to(chain: str, *, new_only: bool = False) -> str:
    match = "-m conntrack --ctstate NEW " if new_only else ""
    return f'{match}-m comment --comment "uproxy {chain.lower()}" -j {chain}'


def assert_jumps_in_place(
    node: Netns, kind: str, foreign_rules: dict[int, list[tuple[str, str, str]]] | None = None
) -> None:
    """Ours first in PREROUTING/OUTPUT/INPUT, node ports last, foreign rules in between in order."""
    for family, rules in (foreign_rules or FOREIGN).items():
        foreign = {(table, chain): [spec for t, c, spec in rules if (t, c) == (table, chain)]
                   for table, chain, _ in rules}
        expected = {
            ("nat", "PREROUTING"): [jump_to(f"{PREFIX}-PORTALS-CONTAINER"),
                                    *foreign[("nat", "PREROUTING")],
                                    jump_to(f"{PREFIX}-NODEPORT-CONTAINER")],
            ("nat", "OUTPUT"): [jump_to(f"{PREFIX}-PORTALS-HOST"), *foreign[("nat", "OUTPUT")],
                                jump_to(f"{PREFIX}-NODEPORT-HOST")],
            ("filter", "INPUT"): [jump_to(f"{PREFIX}-NODEPORT-NON-LOCAL", new_only=True),
                                  *foreign[("filter", "INPUT")]],
        }
        for (table, chain), rules_in_order in expected.items():
            assert chain_order(node, kind, family, table, chain) == rules_in_order, (
                family, table, chain)


def nft_base_chains(node: Netns) -> list[dict[str, Any]]:
    listing = json.loads(node.run("nft", "-j", "list", "chains").stdout)
    return [item["chain"] for item in listing["nftables"]
            if "chain" in item and "hook" in item["chain"]]


def assert_nft_chains_in_place(node: Netns) -> None:
    """nft has no rule positions across tables: hook priorities order the chains.

    On each hook of each family: our portal chains run before every other nat
    chain (lower priority, strictly: equal ones run in no defined order), our
    node-port chains after every other nat chain, and our input filter before
    every other filter chain.
    """
    chains = nft_base_chains(node)
    table = PREFIX.lower()
    for family in ("ip", "ip6"):
        ours = {c["name"]: c for c in chains if c["family"] == family and c["table"] == table}
        others = [c for c in chains if c["family"] == family and c["table"] != table]
        assert set(ours) == {"portals_container", "portals_host", "nodeports_container",
                             "nodeports_host", "nodeport_non_local"}, ours
        for where, hook in (("container", "prerouting"), ("host", "output")):
            rivals = [c["prio"] for c in others if c["hook"] == hook and c["type"] == "nat"]
            assert rivals, (family, hook, others)  # the foreign rules made some
            assert ours[f"portals_{where}"]["hook"] == hook
            assert ours[f"portals_{where}"]["prio"] < min(rivals)
            assert ours[f"nodeports_{where}"]["hook"] == hook
            assert ours[f"nodeports_{where}"]["prio"] > max(rivals)
        rivals = [c["prio"] for c in others if c["hook"] == "input" and c["type"] == "filter"]
        assert rivals and ours["nodeport_non_local"]["prio"] < min(rivals)


def test_jumps_go_first_and_last_around_rules_that_were_there_before(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    node, client = topology
    add_foreign_rules(node, backend.kind)
    assert talk(node, "tcp", "198.18.1.10", 80).startswith("error")  # the foreign DNAT

    backend.apply(DUAL_PORTALS)

    if backend.kind == "nft":
        assert_nft_chains_in_place(node)
    else:
        assert_jumps_in_place(node, backend.kind)
    # Ours run first: the foreign DNAT of the same VIP:port never sees the traffic.
    assert reachable(node, client) == ALL_OK

    if backend.kind != "nft":
        # A lost jump comes back in its place, and a fresh process moves nothing.
        host_jump = f"{PREFIX}-PORTALS-HOST"
        node.run(xtables(backend.kind, 4), "-t", "nat", "-D", "OUTPUT", "-m", "comment",
                 "--comment", f"uproxy {host_jump.lower()}", "-j", host_jump)
        assert jump_to(host_jump) not in chain_order(node, backend.kind, 4, "nat", "OUTPUT")
    backend.apply(DUAL_PORTALS, backend.fresh())
    if backend.kind == "nft":
        assert_nft_chains_in_place(node)
    else:
        assert_jumps_in_place(node, backend.kind)
    node.run("conntrack", "-F", check=False)
    assert reachable(node, client) == ALL_OK


# Rules another program adds after uproxy applied: in front of our first jumps
# (`-I CHAIN 1`) and behind our last one (`-A PREROUTING`).
LATE_FIRST = [("nat", "PREROUTING", "-p tcp -m tcp --dport 7 -j RETURN"),
              ("nat", "OUTPUT", "-p tcp -m tcp --dport 7 -j RETURN"),
              ("filter", "INPUT", "-p tcp -m tcp --dport 7 -j ACCEPT")]
LATE_LAST = ("nat", "PREROUTING", "-p udp -m udp --dport 7 -j RETURN")


def test_a_verifying_apply_moves_pushed_away_jumps_back_and_then_sends_nothing(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    if backend.kind == "nft":
        pytest.skip("nft orders chains by hook priority; no rule positions to push away")
    node, client = topology
    add_foreign_rules(node, backend.kind)
    backend.apply(DUAL_PORTALS)
    assert_jumps_in_place(node, backend.kind)

    for family in FOREIGN:
        tool = xtables(backend.kind, family)
        for table, chain, spec in LATE_FIRST:
            node.run(tool, "-t", table, "-I", chain, "1", *spec.split())
        table, chain, spec = LATE_LAST
        node.run(tool, "-t", table, "-A", chain, *spec.split())
    assert chain_order(node, backend.kind, 4, "nat", "PREROUTING")[0] == LATE_FIRST[0][2]

    backend.apply(DUAL_PORTALS)  # verify=True, the periodic full pass

    # The late rules keep their order among the foreign ones; ours are back at the edges.
    moved: dict[int, list[tuple[str, str, str]]] = {}
    for family, rules in FOREIGN.items():
        moved[family] = [rule for where in (("nat", "PREROUTING"), ("nat", "OUTPUT"),
                                            ("filter", "INPUT"))
                         for rule in [*LATE_FIRST, *rules, LATE_LAST] if rule[:2] == where]
    assert_jumps_in_place(node, backend.kind, moved)
    node.run("conntrack", "-F", check=False)
    assert reachable(node, client) == ALL_OK

    # In place now: the next verifying pass moves nothing (and the iptables
    # backend sends nothing; iptc commits whole tables, which resets counters).
    def without_counters() -> str:  # stray packets (IPv6 ND) move policy counters
        return re.sub(r"\[\d+:\d+\]", "", backend.dump())

    placed = without_counters()
    before = getattr(backend.rules, "restores", 0)
    backend.apply(DUAL_PORTALS)
    assert_jumps_in_place(node, backend.kind, moved)
    if backend.rules is not None:
        assert backend.rules.restores == before
        assert without_counters() == placed


def test_a_jump_of_another_shape_is_replaced_by_ours(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    """An INPUT jump without the conntrack NEW match (an older uproxy's, a hand
    edit) in place is still replaced on the next verifying pass, in place."""
    if backend.kind == "nft":
        pytest.skip("nft has no jump rules: our chains hook in by priority")
    node, _ = topology
    backend.apply(PORTALS)
    target = f"{PREFIX}-NODEPORT-NON-LOCAL"
    tool = xtables(backend.kind, 4)
    node.run(tool, "-t", "filter", "-R", "INPUT", "1", "-m", "comment", "--comment",
             f"uproxy {target.lower()}", "-j", target)
    assert chain_order(node, backend.kind, 4, "filter", "INPUT") == [jump_to(target)]

    backend.apply(PORTALS)  # verify=True, the periodic full pass
    assert chain_order(node, backend.kind, 4, "filter", "INPUT") == [
        jump_to(target, new_only=True)]


def test_a_drop_firewall_stays_shut_for_proxy_ports_and_open_for_redirected_traffic(
    backend: Backend, topology: tuple[Netns, Netns]
) -> None:
    """The node's INPUT policy is DROP. The filter chain accepts redirected
    traffic (VIPs, external and LB IPs, node ports) and nothing else: a
    neighbour dialling NODE_IP:proxyPort of a ClusterIP service stays out.

    nft: an accept in uproxy's table cannot override a drop in another table
    (every base chain on the hook runs), so there the firewall's own rules
    decide; see test_nft_warns_about_a_dropping_input_hook.
    """
    if backend.kind == "nft":
        pytest.skip("nft cannot override another table's drop; the warning test covers it")
    node, client = topology
    tool = xtables(backend.kind, 4)
    node.run(tool, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
             "-j", "ACCEPT")
    node.run(tool, "-P", "INPUT", "DROP")
    assert talk(client, "tcp", NODE_IP, WEB_PORT) == "error TimeoutError"  # the firewall works

    backend.apply(PORTALS)

    # Except the node's own UDP to the VIP: this test server answers from its
    # wildcard socket with the wrong source (uproxy uses IP_PKTINFO), so
    # conntrack sees the answer as a new flow and the policy drops it.
    assert {k: v for k, v in reachable(node, client).items() if k != "node->dns"} == {
        k: v for k, v in ALL_OK.items() if k != "node->dns"}
    assert talk(client, "tcp", NODE_IP, WEB_PORT) == "error TimeoutError"
    assert talk(client, "udp", NODE_IP, WEB_PORT + 1) == "error TimeoutError"


def test_nft_warns_about_a_dropping_input_hook(topology: tuple[Netns, Netns]) -> None:
    node, _ = topology
    rules = NftRules(PREFIX, command_prefix=["ip", "netns", "exec", node.name])
    assert asyncio.run(rules.preflight()) == []
    node.run("iptables", "-P", "INPUT", "DROP")  # iptables-nft: table ip filter, chain INPUT

    warnings = asyncio.run(rules.preflight())

    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("--rules nft: table ip filter chain INPUT drops input")
    assert "ct status dnat accept" in warnings[0]

    # A firewall of its own whose policy accepts but whose last rule rejects.
    node.run("iptables", "-P", "INPUT", "ACCEPT")
    node.run("nft", "-f", "-", input="table inet hostfw {\n chain input {\n"
             "  type filter hook input priority 0; policy accept;\n"
             "  ct state established,related accept\n  counter reject\n }\n}\n")
    warnings = asyncio.run(rules.preflight())
    assert [w.split(",")[0] for w in warnings] == [
        "--rules nft: table inet hostfw chain input ends in a rule that rejects all input"]
