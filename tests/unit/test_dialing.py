"""--dial's routes: which endpoints go through port-forward, and how auto decides."""

from __future__ import annotations

import asyncio
import logging

import pytest

from uproxy.dialing import DialRoutes, network_of
from uproxy.model import Endpoint

POD_A = Endpoint("10.244.1.5", 8080, "shop/web-1")
POD_B = Endpoint("10.244.2.9", 8080, "shop/web-2")  # the same /16
OTHER = Endpoint("10.245.0.3", 8080, "shop/web-3")  # another /16
NO_POD = Endpoint("10.244.1.6", 8080)
V6 = Endpoint("fd00:10:244:1::5", 8080, "shop/web-6")


def test_networks_are_slash_16_and_slash_64() -> None:
    assert network_of("10.244.1.5") == "10.244.0.0/16"
    assert network_of("fd00:10:244:1::5") == "fd00:10:244:1::/64"


def test_portforward_takes_every_endpoint_with_a_pod() -> None:
    routes = DialRoutes("portforward")
    assert routes.via_portforward(POD_A) and routes.via_portforward(V6)
    assert not routes.via_portforward(NO_POD)  # nothing to forward to
    assert routes.route_of(POD_A) == "portforward" and routes.route_of(NO_POD) == "direct"


async def test_auto_probes_each_network_once_and_forwards_until_it_answers(
    caplog: pytest.LogCaptureFixture
) -> None:
    probed: list[Endpoint] = []
    answer = asyncio.Event()

    async def probe(endpoint: Endpoint) -> tuple[bool, str]:
        probed.append(endpoint)
        await answer.wait()
        return endpoint.ip.startswith("10.244."), "a test's answer"

    caplog.set_level(logging.INFO, logger="uproxy.dial")
    routes = DialRoutes("auto", probe=probe)
    routes.observe([POD_A, POD_B, OTHER, NO_POD])
    routes.observe([POD_A, POD_B])  # a later sync: nothing new to probe
    await asyncio.sleep(0)
    assert [e.ip for e in probed] == ["10.244.1.5", "10.245.0.3"]
    assert routes.via_portforward(POD_A)  # undecided: the way that works either way
    assert routes.route_of(POD_A) == "portforward (deciding)"

    answer.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not routes.via_portforward(POD_A) and not routes.via_portforward(POD_B)
    assert routes.via_portforward(OTHER)
    assert (routes.route_of(POD_B), routes.route_of(OTHER)) == ("direct", "portforward")
    decisions = [r.getMessage() for r in caplog.records]
    assert len(decisions) == 2
    assert any("10.244.0.0/16 answer from here" in d for d in decisions)
    assert any("10.245.0.0/16 do not answer from here" in d and "port-forward" in d
               for d in decisions)
    await routes.close()


def test_direct_needs_no_routes() -> None:
    with pytest.raises(ValueError):
        DialRoutes("direct")
