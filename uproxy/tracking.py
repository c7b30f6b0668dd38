"""Fold source events into net changes, kube-proxy style (pure).

Sources report every add, update and delete. Between two syncs the proxier
only needs the net effect per object: the tracker keeps, per object key, the
OLDEST previous object and the NEWEST current one. An add followed by a delete
is nothing; many updates are one change; updates that end where they started
are nothing. `take()` hands the net changes to the sync and starts over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, TypeVar

from uproxy.model import EndpointSlice, Node, ObjectName, Service

T = TypeVar("T", Service, EndpointSlice, Node)

Change = tuple[T | None, T | None]  # (as last applied, as now); None: absent


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Changes:
    """Net changes since the last `take()`, per object key."""

    services: Mapping[ObjectName, Change[Service]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    slices: Mapping[ObjectName, Change[EndpointSlice]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    nodes: Mapping[ObjectName, Change[Node]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @property
    def empty(self) -> bool:
        return not (self.services or self.slices or self.nodes)

    def touched_services(self) -> frozenset[ObjectName]:
        """Services whose own object or any of whose slices changed."""
        touched = set(self.services)
        for previous, current in self.slices.values():
            for endpoint_slice in (previous, current):
                if endpoint_slice is not None:
                    touched.add(endpoint_slice.service)
        return frozenset(touched)

    def apply_to(
        self,
        services: dict[ObjectName, Service],
        slices: dict[ObjectName, EndpointSlice],
        nodes: dict[ObjectName, Node] | None = None,
    ) -> None:
        """Bring the proxier's current maps up to date with these changes."""
        _apply(self.services, services)
        _apply(self.slices, slices)
        if nodes is not None:
            _apply(self.nodes, nodes)


def _apply(changes: Mapping[ObjectName, Change[T]], known: dict[ObjectName, T]) -> None:
    for key, (_, current) in changes.items():
        if current is None:
            known.pop(key, None)
        else:
            known[key] = current


@dataclass(frozen=True, slots=True)
class SourceError:
    message: str
    count: int  # errors reported by this source so far


class _Fold(Generic[T]):
    """One kind of object's pending changes."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: dict[ObjectName, Change[T]] = {}

    def record(self, previous: T | None, current: T | None) -> bool:
        """Fold one event in; True when the pending state changed."""
        if previous is None and current is None:
            return False
        key = current.key if current is not None else previous.key  # type: ignore[union-attr]
        was = self.pending.get(key)
        oldest = previous if was is None else was[0]
        if oldest == current:
            # Back where it started (or never changed): nothing to do.
            return self.pending.pop(key, None) is not None
        if was is not None and was[1] == current:
            return False
        self.pending[key] = (oldest, current)
        return True

    def take(self) -> Mapping[ObjectName, Change[T]]:
        taken, self.pending = self.pending, {}
        return MappingProxyType(taken)


class ChangeTracker:
    """A `uproxy.sources.base.SourceSink` that keeps net changes for the proxier.

    `notify` is called after every event that changed something (and when a
    source completes its first view); the wiring points it at the sync
    runner's `request`.
    """

    def __init__(self, notify: Callable[[], None] = _nothing) -> None:
        self.notify = notify
        self._services: _Fold[Service] = _Fold()
        self._slices: _Fold[EndpointSlice] = _Fold()
        self._nodes: _Fold[Node] = _Fold()
        self._synced: set[str] = set()
        self._errors: dict[str, SourceError] = {}

    # --- SourceSink -----------------------------------------------------------

    def on_service(self, previous: Service | None, current: Service | None) -> None:
        if self._services.record(previous, current):
            self.notify()

    def on_slice(self, previous: EndpointSlice | None, current: EndpointSlice | None) -> None:
        if self._slices.record(previous, current):
            self.notify()

    def on_node(self, previous: Node | None, current: Node | None) -> None:
        if self._nodes.record(previous, current):
            self.notify()

    def on_synced(self, source: str) -> None:
        first = source not in self._synced
        self._synced.add(source)
        if first:
            self.notify()

    def on_source_error(self, source: str, message: str) -> None:
        count = self._errors[source].count + 1 if source in self._errors else 1
        self._errors[source] = SourceError(message, count)

    # --- for the proxier ------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self._services.pending or self._slices.pending or self._nodes.pending)

    def take(self) -> Changes:
        """The net changes since the last call; the tracker starts empty again."""
        return Changes(services=self._services.take(), slices=self._slices.take(),
                       nodes=self._nodes.take())

    @property
    def synced_sources(self) -> frozenset[str]:
        return frozenset(self._synced)

    def synced(self, *sources: str) -> bool:
        """Whether every named source has delivered its first complete view."""
        return all(source in self._synced for source in sources)

    @property
    def errors(self) -> Mapping[str, SourceError]:
        """The last error of each source that reported one."""
        return MappingProxyType(self._errors)
