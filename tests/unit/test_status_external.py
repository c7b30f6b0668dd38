"""/status.json and the path text for a port whose external traffic has its
own endpoints (externalTrafficPolicy: Local)."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_status import DNS, WEB, FakeProxier, port_of
from uproxy.model import Endpoint, ServicePortName
from uproxy.status import build_status

LOCAL = Endpoint("127.0.0.1", 8080)


def local_policy(
    proxier: FakeProxier, name: ServicePortName, external: tuple[Endpoint, ...]
) -> None:
    """What a sync publishes for a Local policy: the planned port with its external set."""
    port = replace(proxier.applied[name], external_endpoints=external)
    proxier.applied[port.name] = port
    proxier.balancer.publish(port)


def test_status_shows_the_external_endpoints_and_how_they_are_picked() -> None:
    proxier = FakeProxier()
    proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"], node_port=30080)
    assert port_of(build_status(proxier, now=0.0), "default/web:http")["external_endpoints"] is None

    local_policy(proxier, WEB, (LOCAL,))
    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert port["external_endpoints"] == ["127.0.0.1:8080"]
    assert [e["address"] for e in port["endpoints"]] == ["127.0.0.1:8080", "127.0.0.2:8080"]
    assert port["path"][-2] == (
        "from outside (node port, external IPs, load-balancer IPs), told apart by the "
        "connection's original destination (SO_ORIGINAL_DST): round-robin over its own "
        "endpoints by the traffic policy: 127.0.0.1:8080")

    local_policy(proxier, WEB, ())
    port = port_of(build_status(proxier, now=0.0), "default/web:http")
    assert port["external_endpoints"] == []
    assert "no endpoints by the traffic policy → connection reset" in port["path"][-2]


def test_udp_says_the_policy_does_not_apply() -> None:
    proxier = FakeProxier()
    proxier.serve(DNS, 53, ["127.0.0.1:5353", "127.0.0.2:5353"], node_port=30053)
    local_policy(proxier, DNS, (Endpoint("127.0.0.1", 5353),))
    port = port_of(build_status(proxier, now=0.0), "kube-system/dns:dns")
    assert port["external_endpoints"] == ["127.0.0.1:5353"]
    assert any("UDP does not tell it apart" in step for step in port["path"])
