"""build_status: what /status.json says about each service port, from plain state.

The fakes here stand in for the proxier, runner and tracker (the web tests
import them too); the balancer and the counters are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uproxy.balancer import Balancer
from uproxy.model import (
    DesiredPort,
    Endpoint,
    Frontend,
    HealthCheck,
    Node,
    ObjectName,
    ServicePortName,
)
from uproxy.stats import PortStats
from uproxy.status import RouteView, build_status

WEB = ServicePortName("default", "web", "http", "TCP")
DNS = ServicePortName("kube-system", "dns", "dns", "UDP")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeProxier:
    """The read-only attributes the real proxier exposes (uproxy.status.StatusInputs)."""

    clock: Clock = field(default_factory=Clock)
    rules_name: str = "iptables"
    chain_prefix: str = "UPROXY"
    laptop_mode: bool = False
    applied: dict[ServicePortName, DesiredPort] = field(default_factory=dict)
    bound: dict[ServicePortName, tuple[str, int]] = field(default_factory=dict)
    errors: dict[ServicePortName, str] = field(default_factory=dict)
    stats: dict[ServicePortName, PortStats] = field(default_factory=dict)
    skipped: dict[ObjectName, str] = field(default_factory=dict)
    routes: RouteView | None = None  # --dial direct
    portforward_streams: int = 0
    node_name: str | None = "node-1"
    node: Node | None = None
    health_checks: dict[ObjectName, HealthCheck] = field(default_factory=dict)
    balancer: Balancer = field(init=False)

    def __post_init__(self) -> None:
        # No shuffle: the round-robin order is the sorted endpoint list.
        self.balancer = Balancer(clock=self.clock, shuffle=lambda endpoints: None)

    def serve(
        self,
        name: ServicePortName,
        port: int,
        endpoints: Sequence[str],
        *,
        cluster_ip: str | None = "198.18.0.10",
        listener: tuple[str, int] | None = ("0.0.0.0", 30001),
        affinity: float | None = None,
        node_port: int | None = None,
    ) -> PortStats:
        """Publish a service port as a sync would; returns its counters."""
        parsed = tuple(Endpoint(e.rpartition(":")[0].strip("[]"), int(e.rpartition(":")[2]))
                       for e in endpoints)
        frontend = Frontend(name, port, name.protocol,
                            cluster_ips=(cluster_ip,) if cluster_ip else (),
                            node_port=node_port)
        self.applied[name] = DesiredPort(frontend, parsed, affinity)
        if listener is not None:
            self.bound[name] = listener
        stats = self.stats.setdefault(name, PortStats())
        self.balancer.update(name, parsed, affinity)
        return stats

    def connect(self, name: ServicePortName, client: str = "127.0.0.1") -> Endpoint:
        """What a listener does on accept: pick (counted) and open a connection."""
        stats = self.stats[name]
        endpoint = self.balancer.picker(name, stats).pick(client)
        stats.connections_accepted += 1
        stats.connections_active += 1
        return endpoint


@dataclass
class FakeRunner:
    last_success: float | None = None
    syncs: int = 0


@dataclass
class FakeTracker:
    synced_sources: set[str] = field(default_factory=set)


def port_of(status: dict[str, Any], port_id: str) -> dict[str, Any]:
    for service in status["services"]:
        for port in service["ports"]:
            if port["id"] == port_id:
                return port  # type: ignore[no-any-return]
    raise AssertionError(f"{port_id} not in status")


RULE = ('-d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "default/web:http" '
        "-j {target}")


def test_rules_mode_port_explains_the_redirect_listener_and_next_pick() -> None:
    proxier = FakeProxier()
    proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"])

    status = build_status(proxier, now=0.0)
    port = port_of(status, "default/web:http")

    assert status["mode"] == "rules" and status["rules"] == "iptables"
    assert port["address"] == "198.18.0.10:80"
    assert port["listener"] == "0.0.0.0:30001"
    assert port["path"] == [
        "client connects to 198.18.0.10:80/TCP: a virtual IP, nothing listens there",
        # The very rule text the backend installs (and `uproxy explain` prints).
        "to 198.18.0.10:80 from this host: nat OUTPUT -> UPROXY-PORTALS-HOST -> "
        "UPROXY-PORTALS-CONTAINER: " + RULE.format(target="REDIRECT --to-ports 30001"),
        "to 198.18.0.10:80 from pods/other hosts: nat PREROUTING -> UPROXY-PORTALS-CONTAINER: "
        + RULE.format(target="REDIRECT --to-ports 30001"),
        "listener 0.0.0.0:30001 (TCP) accepts the connection",
        "balancer: round-robin over 2 endpoints, next: 127.0.0.1:8080",
        "dial the endpoint at once (4 attempts of 250 ms → 500 ms → 1 s → 2 s, failing over "
        "to the next endpoint), then relay bytes both ways",
    ]
    assert [e["address"] for e in port["endpoints"]] == ["127.0.0.1:8080", "127.0.0.2:8080"]
    assert [e["next"] for e in port["endpoints"]] == [True, False]


def test_picks_and_counters_follow_connections() -> None:
    proxier = FakeProxier()
    stats = proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"])

    for _ in range(3):
        proxier.connect(WEB)
    stats.connections_active -= 1
    stats.bytes_in, stats.bytes_out = 120, 4096

    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert {e["address"]: e["picks"] for e in port["endpoints"]} == {
        "127.0.0.1:8080": 2, "127.0.0.2:8080": 1}
    assert port["next_endpoint"] == "127.0.0.2:8080"
    assert port["path"][4] == "balancer: round-robin over 2 endpoints, next: 127.0.0.2:8080"
    assert port["connections"] == {"accepted": 3, "active": 2, "failed": 0, "no_endpoints": 0}
    assert port["bytes"] == {"in": 120, "out": 4096}
    assert build_status(proxier, now=0.0)["totals"]["connections_active"] == 2


def test_listener_on_one_address_is_reached_by_dnat() -> None:
    proxier = FakeProxier()
    proxier.serve(WEB, 80, ["127.0.0.1:8080"], listener=("10.1.2.3", 30002), node_port=31080)

    path = port_of(build_status(proxier, now=0.0), "default/web:http")["path"]
    assert path[3].endswith(RULE.format(target="DNAT --to-destination 10.1.2.3:30002"))
    assert path[1] == ("to node port 31080 from this host: nat OUTPUT -> UPROXY-NODEPORT-HOST "
                       "-> UPROXY-NODEPORT-CONTAINER: -p tcp -m addrtype --dst-type LOCAL "
                       '-m tcp --dport 31080 -m comment --comment "default/web:http" '
                       "-j DNAT --to-destination 10.1.2.3:30002")
    assert "balancer: round-robin over 1 endpoint, next: 127.0.0.1:8080" in path


def test_ipv6_portal_uses_a_128_mask() -> None:
    proxier = FakeProxier(chain_prefix="KP")
    proxier.serve(WEB, 80, ["[fd00::1]:8080"], cluster_ip="fd00:198::10",
                  listener=("::", 30003))

    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert port["address"] == "[fd00:198::10]:80"
    assert port["listener"] == "[::]:30003"
    assert port["path"][1] == (
        "to [fd00:198::10]:80 from this host: nat OUTPUT -> KP-PORTALS-HOST -> "
        "KP-PORTALS-CONTAINER: -d fd00:198::10/128 -p tcp -m tcp --dport 80 "
        '-m comment --comment "default/web:http" -j REDIRECT --to-ports 30003')
    assert port["endpoints"][0]["address"] == "[fd00::1]:8080"


def test_laptop_mode_shows_the_service_ip_and_no_rules() -> None:
    proxier = FakeProxier(rules_name="none", laptop_mode=True)
    proxier.serve(WEB, 80, ["127.0.0.1:8080"], cluster_ip=None, listener=("127.77.0.1", 80))

    status = build_status(proxier, now=0.0)
    port = port_of(status, "default/web:http")
    assert status["mode"] == "laptop"
    assert port["address"] == "127.77.0.1:80"
    assert port["path"][0].startswith("client connects straight to 127.77.0.1:80/TCP")
    assert not any("nat " in step for step in port["path"])


def test_affinity_pins_are_listed_with_time_left() -> None:
    clock = Clock()
    proxier = FakeProxier(clock=clock)
    proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"], affinity=30.0)

    first = proxier.connect(WEB, client="127.0.0.9")
    clock.now += 10
    again = proxier.connect(WEB, client="127.0.0.9")

    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert first == again
    assert port["affinity"] == {
        "timeout_seconds": 30.0,
        "pinned_total": 1,
        "pins": [{"client": "127.0.0.9", "endpoint": str(first), "seconds_left": 30.0}],
    }
    assert [e["pinned_clients"] for e in port["endpoints"]] == [1, 0]
    assert port["path"][4].startswith("balancer: ClientIP affinity, 30 s (1 pinned clients)")


def test_only_the_first_pins_are_listed_but_all_are_counted() -> None:
    proxier = FakeProxier()
    proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"], affinity=60.0)
    for i in range(120):
        proxier.connect(WEB, client=f"127.0.1.{i}")

    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert port["affinity"]["pinned_total"] == 120
    assert len(port["affinity"]["pins"]) == 50
    assert sum(e["pinned_clients"] for e in port["endpoints"]) == 120


def test_udp_port_without_endpoints_drops_datagrams() -> None:
    proxier = FakeProxier()
    stats = proxier.serve(DNS, 53, [], cluster_ip="198.18.0.53", listener=("0.0.0.0", 30053))
    stats.udp_datagrams_dropped = 4

    port = port_of(build_status(proxier, now=0.0), "kube-system/dns:dns")
    assert port["protocol"] == "UDP"
    assert port["endpoints"] == []
    assert port["udp"]["datagrams_dropped"] == 4
    assert "-p udp -m udp --dport 53" in port["path"][1]
    assert port["path"][-1] == "balancer: no endpoints → datagram dropped (counted as no_endpoints)"


def test_port_that_could_not_bind_says_why() -> None:
    proxier = FakeProxier()
    proxier.serve(WEB, 80, ["127.0.0.1:8080"], listener=None)
    proxier.errors[WEB] = "proxy port range 30000-30000 exhausted"

    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert port["listener"] is None
    assert port["error"] == "proxy port range 30000-30000 exhausted"
    assert port["path"] == ["not served: proxy port range 30000-30000 exhausted"]


def test_nft_backend_names_its_table() -> None:
    proxier = FakeProxier(rules_name="nft")
    proxier.serve(WEB, 80, ["127.0.0.1:8080"])
    path = port_of(build_status(proxier, now=0.0), "default/web:http")["path"]
    assert path[1] == ("to 198.18.0.10:80 from this host: table ip uproxy portals_host "
                       "(hook output) map @portal_redirect: "
                       '198.18.0.10 . tcp . 80 comment "default/web:http" : 30001')


def test_sync_section_and_readiness() -> None:
    proxier = FakeProxier()
    runner, tracker = FakeRunner(), FakeTracker()
    required = {"services", "endpointslices"}

    before = build_status(proxier, runner, tracker, required, now=50.0)["sync"]
    assert before == {"syncs": 0, "last_success_age_seconds": None, "sources_synced": [],
                      "sources_missing": ["endpointslices", "services"], "ready": False}

    tracker.synced_sources |= required
    runner.last_success, runner.syncs = 48.5, 1
    after = build_status(proxier, runner, tracker, required, now=50.0)["sync"]
    assert after["ready"] is True
    assert after["last_success_age_seconds"] == 1.5
    assert after["sources_missing"] == []


def test_status_is_json_and_groups_ports_by_service() -> None:
    proxier = FakeProxier()
    proxier.serve(WEB, 80, ["127.0.0.1:8080"])
    https = ServicePortName("default", "web", "https", "TCP")
    proxier.serve(https, 443, ["127.0.0.1:8443"], listener=("0.0.0.0", 30004))
    proxier.serve(DNS, 53, ["127.0.0.1:5353"], listener=("0.0.0.0", 30005))
    proxier.skipped[ObjectName("default", "db")] = "headless service"

    status = json.loads(json.dumps(build_status(proxier, now=0.0)))
    assert [s["service"] for s in status["services"]] == ["default/web", "kube-system/dns"]
    assert [p["port"] for p in status["services"][0]["ports"]] == [80, 443]
    assert status["totals"] == {"services": 2, "service_ports": 3, "listeners": 3,
                                "endpoints": 3, "connections_active": 0,
                                "udp_sessions_active": 0}
    assert status["skipped"] == [{"service": "default/db", "reason": "headless service"}]


def test_the_node_and_its_health_checks_are_in_the_document() -> None:
    proxier = FakeProxier()
    status = build_status(proxier, now=proxier.clock.now)
    assert status["node"] == {"name": "node-1", "known": False, "zone": "",
                              "terminating": False}
    assert status["health_checks"] == []
    proxier.node = Node("node-1", "zone-a", terminating=True)
    proxier.health_checks = {ObjectName("shop", "web"): HealthCheck(32000, 2)}
    status = build_status(proxier, now=proxier.clock.now)
    assert status["node"] == {"name": "node-1", "known": True, "zone": "zone-a",
                              "terminating": True}
    assert status["health_checks"] == [{"service": "shop/web", "node_port": 32000,
                                        "local_endpoints": 2}]
