"""What a source is: something that reports Services and EndpointSlices.

Sources produce model objects and nothing else. They report changes as
(previous, current) pairs to a `SourceSink` (the proxier's change tracker);
`None` on either side means created or deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from uproxy.model import EndpointSlice, ObjectName, Service


class SourceSink(Protocol):
    def on_service(self, previous: Service | None, current: Service | None) -> None: ...

    def on_slice(
        self, previous: EndpointSlice | None, current: EndpointSlice | None
    ) -> None: ...

    def on_synced(self, source: str) -> None:
        """The source has delivered one complete view (first list, first file load)."""

    def on_source_error(self, source: str, message: str) -> None:
        """A fault the source survives (bad file, watch dropped); state keeps serving."""


class Source(Protocol):
    name: str

    async def run(self, sink: SourceSink) -> None:
        """Report objects until cancelled. Never returns on its own."""


T = TypeVar("T", Service, EndpointSlice)


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
        if previous != current:
            known[key] = current
            report(previous, current)
            changes += 1
    return changes

