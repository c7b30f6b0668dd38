"""The single writer's apply order, over the three fakes writing one timeline.

Additions: listener, endpoints, then the rules that steer traffic to it.
Removals: rules, then the listener, then the endpoints. A frontend change:
the new listener opens before the rules move and the old one closes after.
"""

from __future__ import annotations

from uproxy.fakes import FakeEndpoints, FakeListeners
from uproxy.model import (
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
)
from uproxy.proxier import Proxier
from uproxy.rules.fake import FakeRules
from uproxy.tracking import ChangeTracker

WEB = ServicePortName("default", "web", "http", "TCP")


def web(port: int = 80) -> Service:
    return Service("default", "web", (ServicePortSpec("http", port, "TCP", 8080),),
                   cluster_ips=("198.18.0.10",))


def web_slice(*ips: str) -> EndpointSlice:
    return EndpointSlice("default", "web-x", "web", "IPv4", (EndpointPort("http", 8080),),
                         tuple(SliceEndpoint((ip,)) for ip in ips))


class Timeline:
    def __init__(self, *, refuse: frozenset[ServicePortName] = frozenset()) -> None:
        self.events: list[str] = []
        self.tracker = ChangeTracker()
        self.listeners = FakeListeners(self.events, refuse=refuse)
        self.endpoints = FakeEndpoints(self.events)
        self.rules = FakeRules()
        self.rules.events = self.events
        self.proxier = Proxier(self.tracker, self.listeners, self.rules, self.endpoints,
                               required_sources=("test",))
        self.tracker.on_synced("test")

    async def sync(self) -> list[str]:
        self.events.clear()
        await self.proxier.sync()
        return list(self.events)


async def test_a_new_port_listens_then_publishes_then_gets_its_rules() -> None:
    t = Timeline()
    t.tracker.on_service(None, web())
    t.tracker.on_slice(None, web_slice("10.0.0.1"))
    assert await t.sync() == [f"listen {WEB}", f"publish {WEB}", "rules:1"]


async def test_a_removed_port_loses_its_rules_then_its_listener_then_its_endpoints() -> None:
    t = Timeline()
    t.tracker.on_service(None, web())
    await t.sync()
    t.tracker.on_service(web(), None)
    assert await t.sync() == ["rules:0", f"close {WEB}", f"unpublish {WEB}", f"forget {WEB}"]


async def test_a_changed_frontend_opens_the_new_listener_before_the_rules_move() -> None:
    t = Timeline()
    t.tracker.on_service(None, web(80))
    await t.sync()
    t.tracker.on_service(web(80), web(8000))
    assert await t.sync() == [f"listen {WEB}", f"publish {WEB}", "rules:1", f"close {WEB}"]
    (portal,) = t.rules.portals
    assert portal.frontend.port == 8000


async def test_an_endpoint_change_publishes_and_moves_no_listener() -> None:
    t = Timeline()
    t.tracker.on_service(None, web())
    t.tracker.on_slice(None, web_slice("10.0.0.1"))
    await t.sync()
    t.tracker.on_slice(web_slice("10.0.0.1"), web_slice("10.0.0.1", "10.0.0.2"))
    events = await t.sync()
    assert events[0] == f"publish {WEB}"
    assert not [e for e in events if e.startswith(("listen", "close"))]
    assert len(t.endpoints.published[WEB].endpoints) == 2


async def test_a_port_that_cannot_listen_is_neither_published_nor_steered() -> None:
    t = Timeline(refuse=frozenset({WEB}))
    t.tracker.on_service(None, web())
    assert await t.sync() == [f"refuse {WEB}", "rules:0"]
    assert WEB in t.proxier.errors and t.rules.portals == ()
