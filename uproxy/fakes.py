"""In-memory fakes of the listener and endpoint sides the proxier drives
(`uproxy.applying`), for tests of the apply order. Each writes what happens
to a shared `events` list, as `uproxy.rules.fake.FakeRules` does:

    listen default/web:http    publish default/web:http    rules:1
"""

from __future__ import annotations

from collections.abc import Mapping

from uproxy.balancer import BalancerView
from uproxy.model import DesiredPort, ServicePortName
from uproxy.stats import PortStats


class FakeListeners:
    """Listeners that bind nothing: port N of the fake range per opened port."""

    def __init__(self, events: list[str], *, laptop_mode: bool = False,
                 refuse: frozenset[ServicePortName] = frozenset()) -> None:
        self.events = events
        self.laptop_mode = laptop_mode
        self.refuse = refuse  # ports whose listener cannot be bound
        self._bound: dict[ServicePortName, tuple[str, int]] = {}
        self._unserved: dict[ServicePortName, str] = {}
        self._stats: dict[ServicePortName, PortStats] = {}
        self._next_port = 40000

    @property
    def bound(self) -> Mapping[ServicePortName, tuple[str, int]]:
        return self._bound

    @property
    def unserved(self) -> Mapping[ServicePortName, str]:
        return self._unserved

    @property
    def stats(self) -> Mapping[ServicePortName, PortStats]:
        return self._stats

    def open(self, port: DesiredPort) -> bool:
        name = port.name
        if name in self.refuse:
            self._unserved[name] = f"{name}: refused by the test"
            self.events.append(f"refuse {name}")
            return False
        self._next_port += 1
        self._bound[name] = ("0.0.0.0", self._next_port)
        self._unserved.pop(name, None)
        self._stats.setdefault(name, PortStats())
        self.events.append(f"listen {name}")
        return True

    def detach(self, name: ServicePortName) -> ServicePortName | None:
        return name if self._bound.pop(name, None) is not None else None

    def retire(self, detached: ServicePortName) -> None:
        self.events.append(f"close {detached}")

    def forget(self, name: ServicePortName) -> None:
        self._stats.pop(name, None)
        self._unserved.pop(name, None)
        self.events.append(f"forget {name}")


class FakeEndpoints:
    """A balancer's publishing side that only says what it was told."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.published: dict[ServicePortName, DesiredPort] = {}

    def publish(self, port: DesiredPort) -> None:
        self.published[port.name] = port
        self.events.append(f"publish {port.name}")

    def remove(self, name: ServicePortName) -> None:
        self.published.pop(name, None)
        self.events.append(f"unpublish {name}")

    def expire_pins(self) -> int:
        return 0

    def snapshot(self, name: ServicePortName) -> BalancerView:
        port = self.published.get(name)
        endpoints = () if port is None else port.endpoints
        return BalancerView(name, endpoints, 0, None if port is None else port.affinity_timeout,
                            ())
