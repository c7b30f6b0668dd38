"""An in-memory rules backend for tests of the proxier and shutdown order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from uproxy.rules.base import Portal, PortalDelta, RulesError


class FakeRules:
    name = "fake"

    def __init__(self) -> None:
        self.portals: tuple[Portal, ...] = ()
        self.applies = 0
        self.cleanups = 0
        self.verified = 0  # applies that were full (verify=True) passes
        self.fail_next: str | None = None  # set to make the next apply fail
        self.events: list[str] = []  # shared timeline with other fakes, if given
        self.deltas = 0  # applies that came with a delta (each one checked)
        self.bad_deltas: list[str] = []  # deltas that did not match the lists
        self._offered: tuple[Portal, ...] = ()  # the list of the previous call

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        previous, self._offered = self._offered, tuple(portals)
        if delta is not None:
            # A backend may trust the delta instead of the list: it must be exact.
            before, after = Counter(previous), Counter(portals)
            if Counter(delta.gone) != before - after or Counter(delta.new) != after - before:
                self.bad_deltas.append(f"{delta} != gone {before - after}, new {after - before}")
            self.deltas += 1
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise RulesError(message)
        self.applies += 1
        self.verified += verify
        self.portals = tuple(portals)
        self.events.append(f"rules:{len(self.portals)}")

    async def cleanup(self) -> None:
        self.cleanups += 1
        self.portals = ()
        self.events.append("rules:cleanup")

    async def preflight(self) -> list[str]:
        return []

    def render(self, portals: Sequence[Portal]) -> str:
        return "".join(
            f"{p.frontend.name} {p.frontend.protocol} {p.frontend.port} -> "
            f"{p.proxy_ip}:{p.proxy_port}\n"
            for p in portals
        )
