"""What a source is: something that reports Services, EndpointSlices and Nodes.

Sources produce model objects and nothing else. They report changes as
(previous, current) pairs to a `SourceSink` (the proxier's change tracker);
`None` on either side means created or deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from uproxy.model import EndpointSlice, Node, ObjectName, Service


class SourceSink(Protocol):
    def on_service(self, previous: Service | None, current: Service | None) -> None: ...

    def on_slice(
        self, previous: EndpointSlice | None, current: EndpointSlice | None
    ) -> None: ...

    def on_node(self, previous: Node | None, current: Node | None) -> None:
        """A Node (this node's zone and whether it is going away)."""

    def on_synced(self, source: str) -> None:
        """The source has delivered one complete view (first list, first file load)."""

    def on_source_error(self, source: str, message: str) -> None:
        """A fault the source survives (bad file, watch dropped); state keeps serving."""


@dataclass(frozen=True)
class SourceCounters:
    """Per resource, what a source survived and how it listed (for /metrics)."""

    watch_restarts: Mapping[str, int] = field(default_factory=dict)
    relists: Mapping[str, int] = field(default_factory=dict)
    list_pages: Mapping[str, int] = field(default_factory=dict)
    expired_lists: Mapping[str, int] = field(default_factory=dict)


class Source(Protocol):
    """A source of Services and EndpointSlices. The hooks after `run` have
    no-op defaults; a source subclasses this to inherit them."""

    name: str

    async def run(self, sink: SourceSink) -> None:
        """Report objects until cancelled. Never returns on its own."""

    def load_initial(self) -> None:
        """What must be good before anything listens (a services file): raise
        an exception whose text is one line, and uproxy stops at start."""
        return None

    async def prepare(self) -> None:
        """Load configuration (a kubeconfig) before anything listens; a bad one
        raises an exception whose text is one line."""
        return None

    def reload(self) -> None:
        """SIGHUP: read again now (from the loop's thread)."""
        return None

    def counters(self) -> SourceCounters:
        return SourceCounters()


T = TypeVar("T", Service, EndpointSlice, Node)


def replace_all(
    known: dict[ObjectName, T],
    fresh: Mapping[ObjectName, T],
    report: Callable[[T | None, T | None], None],
) -> int:
    """Make `known` equal to `fresh`, reporting only what differs.

    Used after a file reload or a relist: unchanged objects produce no
    event, so listeners and rules do not flap. Returns how many changes
    were reported.
    """
    changes = 0
    for key in sorted(set(known) - set(fresh)):
        report(known.pop(key), None)
        changes += 1
    for key in sorted(fresh):
        current = fresh[key]
        previous = known.get(key)
        if previous is not current and previous != current:
            known[key] = current
            report(previous, current)
            changes += 1
    return changes

