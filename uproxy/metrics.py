"""Prometheus metrics, read from the proxier's plain counters at scrape time.

The data path only adds to ints on `PortStats` (uproxy/stats.py); nothing
here runs per packet or per connection. A custom collector turns those ints
into metric families when `/metrics` is scraped, in its own registry (never
the process-global one, so tests and several apps in one process do not mix).

The runner feeds `SyncMetrics` after each sync; sources feed `SourceMetrics`
when a watch restarts, a relist happens, or a file reload fails.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from uproxy.model import ServicePortName
from uproxy.stats import PortStats
from uproxy.status import StatusInputs

# Dialling an endpoint: sub-millisecond on loopback, up to the 2 s last retry.
DIAL_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0,
)
# kube-proxy's sync_proxy_rules_duration_seconds buckets (exponential 1 ms .. ~16 s).
SYNC_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**i for i in range(15))

PORT_LABELS = ("service", "port", "protocol")
SNAPSHOT_SLICE = 100  # service ports copied between yields to the loop


class SyncMetrics:
    """What the sync runner reports: durations, last success, apply failures."""

    def __init__(self, registry: CollectorRegistry, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.duration = Histogram(
            "uproxy_sync_duration_seconds",
            "How long one sync of listeners, rules and balancer took.",
            buckets=SYNC_BUCKETS,
            registry=registry,
        )
        self.last_timestamp = Gauge(
            "uproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync.",
            registry=registry,
        )
        self.apply_failures = Counter(
            "uproxy_rules_apply_failures",
            "Rule applies that failed (the previous rules stayed in place).",
            registry=registry,
        )

    def observe_sync(self, seconds: float) -> None:
        """A sync succeeded after `seconds`."""
        self.duration.observe(seconds)
        self.last_timestamp.set(self._wall())

    def rules_apply_failed(self) -> None:
        self.apply_failures.inc()


@dataclass
class SourceMetrics:
    """What sources counted, copied in by the app's housekeeping; read at scrape time."""

    watch_restarts: dict[tuple[str, str], int] = field(default_factory=dict)
    relists: dict[tuple[str, str], int] = field(default_factory=dict)
    list_pages: dict[tuple[str, str], int] = field(default_factory=dict)
    expired_lists: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


class _DialHistogram:
    """Cumulative dial latency buckets for one port, fed by draining PortStats."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DIAL_BUCKETS) + 1)  # last: +Inf
        self.total = 0.0

    def add(self, samples: Sequence[float]) -> None:
        for seconds in samples:
            self.counts[bisect.bisect_left(DIAL_BUCKETS, seconds)] += 1
            self.total += seconds


@dataclass(slots=True)
class _PortFigures:
    name: ServicePortName
    labels: list[str]  # service, port, protocol
    udp: bool
    accepted: int
    active: int
    failed: int
    no_endpoints: int
    bytes_in: int
    bytes_out: int
    dial_attempts_failed: int
    dial_counts: list[int]
    dial_total: float
    udp_active: int
    udp_created: int
    udp_expired: int
    udp_dropped: int
    accept_backoffs: int
    picks: list[tuple[str, int]]


@dataclass(slots=True)
class Figures:
    """Every number one scrape exposes, copied off the live state."""

    services: int
    endpoints: int
    listeners: int
    unserved: int
    ports: list[_PortFigures]
    accept_backoffs: int
    watch_restarts: list[tuple[tuple[str, str], int]]
    relists: list[tuple[tuple[str, str], int]]
    list_pages: list[tuple[tuple[str, str], int]]
    expired_lists: list[tuple[tuple[str, str], int]]
    source_errors: list[tuple[str, int]]
    portforward_streams: int = 0


class ProxyCollector(Collector):
    """Per service port and global figures from the proxier's state.

    `snapshot` must run on the event loop (it reads live dicts and drains dial
    latencies); `families` turns a snapshot into metric families anywhere, so
    the costly part of a scrape can run off the loop.
    """

    def __init__(self, proxier: StatusInputs, sources: SourceMetrics) -> None:
        self._proxier = proxier
        self._sources = sources
        self._dial: dict[ServicePortName, _DialHistogram] = {}
        # accept backoffs of ports that are gone, so the total never goes down
        self._backoffs_seen: dict[ServicePortName, int] = {}
        self._backoffs_retired = 0

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on the live state

    def collect(self) -> Iterator[Metric]:
        return families(self.snapshot())

    def snapshot(self) -> Figures:
        names = sorted(self._proxier.stats)
        return self._finish([self._port(name) for name in names])

    async def snapshot_in_slices(self, size: int = SNAPSHOT_SLICE) -> Figures:
        """As `snapshot`, yielding to the loop every `size` ports.

        A port added meanwhile waits for the next scrape; one removed
        meanwhile is left out. Prometheus tolerates that skew.
        """
        stats = self._proxier.stats
        ports: list[_PortFigures] = []
        for index, name in enumerate(sorted(stats)):
            if index and index % size == 0:
                await asyncio.sleep(0)
            if name in stats:
                ports.append(self._port(name))
        return self._finish(ports)

    def _port(self, name: ServicePortName) -> _PortFigures:
        port_stats = self._proxier.stats[name]
        desired = self._proxier.applied.get(name)
        number = str(desired.frontend.port) if desired is not None else name.port
        histogram = self._dial_histogram(name, port_stats)
        return _PortFigures(
            name=name,
            labels=[f"{name.namespace}/{name.name}", number, name.protocol],
            udp=name.protocol == "UDP",
            accepted=port_stats.connections_accepted,
            active=port_stats.connections_active,
            failed=port_stats.connections_failed,
            no_endpoints=port_stats.no_endpoints,
            bytes_in=port_stats.bytes_in,
            bytes_out=port_stats.bytes_out,
            dial_attempts_failed=port_stats.dial_attempts_failed,
            dial_counts=list(histogram.counts),
            dial_total=histogram.total,
            udp_active=port_stats.udp_sessions_active,
            udp_created=port_stats.udp_sessions_created,
            udp_expired=port_stats.udp_sessions_expired,
            udp_dropped=port_stats.udp_datagrams_dropped,
            accept_backoffs=port_stats.accept_backoffs,
            picks=list(port_stats.picks.items()),
        )

    def _finish(self, ports: list[_PortFigures]) -> Figures:
        proxier = self._proxier
        applied = proxier.applied
        live = set(proxier.stats)
        for name in set(self._dial) - live:
            del self._dial[name]
        backoffs_now = {port.name: port.accept_backoffs for port in ports}
        for name, seen in self._backoffs_seen.items():
            if name not in backoffs_now:
                self._backoffs_retired += seen
        self._backoffs_seen = backoffs_now
        return Figures(
            services=len({name.service for name in applied}),
            endpoints=sum(len(p.endpoints) for p in applied.values()),
            listeners=len(proxier.bound),
            unserved=len(proxier.errors),
            ports=ports,
            accept_backoffs=self._backoffs_retired + sum(backoffs_now.values()),
            watch_restarts=sorted(self._sources.watch_restarts.items()),
            relists=sorted(self._sources.relists.items()),
            list_pages=sorted(self._sources.list_pages.items()),
            expired_lists=sorted(self._sources.expired_lists.items()),
            source_errors=sorted(self._sources.errors.items()),
            portforward_streams=proxier.portforward_streams,
        )

    def _dial_histogram(self, name: ServicePortName, port_stats: PortStats) -> _DialHistogram:
        histogram = self._dial.get(name)
        if histogram is None:
            histogram = self._dial[name] = _DialHistogram()
        if port_stats.dial_latencies:
            # Swap, not copy: the relay appends to the new list from now on.
            samples, port_stats.dial_latencies = port_stats.dial_latencies, []
            histogram.add(samples)
        return histogram


def _cumulative(counts: Sequence[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*DIAL_BUCKETS, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


def families(figures: Figures) -> Iterator[Metric]:
    """The metric families of one snapshot (pure; safe in a worker thread)."""
    services = GaugeMetricFamily("uproxy_services", "Services with at least one proxied port.")
    services.add_metric([], figures.services)
    endpoints = GaugeMetricFamily("uproxy_endpoints", "Endpoints summed over service ports.")
    endpoints.add_metric([], figures.endpoints)
    listeners = GaugeMetricFamily("uproxy_listeners", "Listeners bound.")
    listeners.add_metric([], figures.listeners)
    unserved = GaugeMetricFamily(
        "uproxy_service_ports_unserved",
        "Service ports without a listener (bind failed, port range exhausted).")
    unserved.add_metric([], figures.unserved)
    streams = GaugeMetricFamily(
        "uproxy_portforward_streams",
        "Port-forward WebSockets open now through the API server (--dial).")
    streams.add_metric([], figures.portforward_streams)
    yield from (services, endpoints, listeners, unserved, streams)

    accepted = CounterMetricFamily(
        "uproxy_connections", "TCP connections accepted.", labels=PORT_LABELS)
    active = GaugeMetricFamily(
        "uproxy_connections_active", "TCP connections open now.", labels=PORT_LABELS)
    failures = CounterMetricFamily(
        "uproxy_connection_failures",
        "Connections (TCP) or datagrams (UDP) not served: reason=dial, every dial attempt "
        "failed; reason=no_endpoints, there was no endpoint to dial.",
        labels=(*PORT_LABELS, "reason"))
    byte_count = CounterMetricFamily(
        "uproxy_bytes", "Bytes relayed; in: client to endpoint, out: endpoint to client.",
        labels=(*PORT_LABELS, "direction"))
    dial = HistogramMetricFamily(
        "uproxy_dial_duration_seconds", "Time to connect to an endpoint.", labels=PORT_LABELS)
    dial_failed = CounterMetricFamily(
        "uproxy_dial_failures",
        "Dial attempts to an endpoint that failed (refused, timed out, unreachable), "
        "also those after which failover to another endpoint succeeded.",
        labels=PORT_LABELS)
    udp_active = GaugeMetricFamily(
        "uproxy_udp_sessions_active", "UDP client sessions open now.", labels=PORT_LABELS)
    udp_sessions = CounterMetricFamily(
        "uproxy_udp_sessions", "UDP client sessions created and expired.",
        labels=(*PORT_LABELS, "event"))
    udp_dropped = CounterMetricFamily(
        "uproxy_udp_datagrams_dropped", "UDP datagrams dropped.", labels=PORT_LABELS)
    picks = CounterMetricFamily(
        "uproxy_endpoint_picks", "Times the balancer picked an endpoint.",
        labels=(*PORT_LABELS, "endpoint"))
    for port in figures.ports:
        labels = port.labels
        accepted.add_metric(labels, port.accepted)
        active.add_metric(labels, port.active)
        failures.add_metric([*labels, "dial"], port.failed)
        failures.add_metric([*labels, "no_endpoints"], port.no_endpoints)
        byte_count.add_metric([*labels, "in"], port.bytes_in)
        byte_count.add_metric([*labels, "out"], port.bytes_out)
        dial.add_metric(labels, _cumulative(port.dial_counts), port.dial_total)
        dial_failed.add_metric(labels, port.dial_attempts_failed)
        if port.udp:
            udp_active.add_metric(labels, port.udp_active)
            udp_sessions.add_metric([*labels, "created"], port.udp_created)
            udp_sessions.add_metric([*labels, "expired"], port.udp_expired)
            udp_dropped.add_metric(labels, port.udp_dropped)
        for endpoint, count in sorted(port.picks):
            picks.add_metric([*labels, endpoint], count)
    yield from (accepted, active, failures, byte_count, dial, dial_failed,
                udp_active, udp_sessions, udp_dropped, picks)

    backoffs = CounterMetricFamily(
        "uproxy_accept_backoffs",
        "Times a listener paused accepting because file descriptors ran out (EMFILE).")
    backoffs.add_metric([], figures.accept_backoffs)
    restarts = CounterMetricFamily(
        "uproxy_source_watch_restarts", "Watches that ended and were restarted.",
        labels=("source", "resource"))
    for (source, resource), count in figures.watch_restarts:
        restarts.add_metric([source, resource], count)
    per_resource = []
    for metric, text, rows in (
        ("uproxy_source_relists", "Full relists (e.g. after 410 Gone).", figures.relists),
        ("uproxy_source_list_pages", "LIST requests answered (a list comes in pages of 500).",
         figures.list_pages),
        ("uproxy_source_expired_lists",
         "Paged lists whose continue token expired (410); listed again without a limit.",
         figures.expired_lists),
    ):
        family = CounterMetricFamily(metric, text, labels=("source", "resource"))
        for (source, resource), count in rows:
            family.add_metric([source, resource], count)
        per_resource.append(family)
    errors = CounterMetricFamily(
        "uproxy_source_errors", "Source faults survived (bad services file, failed reload).",
        labels=("source",))
    for source, count in figures.source_errors:
        errors.add_metric([source], count)
    yield from (backoffs, restarts, *per_resource, errors)


class _Joined(Collector):
    """Several collectors as one, for one scrape."""

    def __init__(self, *parts: Collector) -> None:
        self._parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            yield from part.collect()


class _Frozen(Collector):
    def __init__(self, figures: Figures) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        return families(self._figures)


class Metrics:
    """The registry behind `/metrics`, and the hooks that feed it."""

    def __init__(self, proxier: StatusInputs, wall: Callable[[], float] = time.time) -> None:
        self._sync_registry = CollectorRegistry(auto_describe=False)
        self.sync = SyncMetrics(self._sync_registry, wall)
        self.sources = SourceMetrics()
        self.collector = ProxyCollector(proxier, self.sources)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._sync_registry)
        self.registry.register(self.collector)

    async def scrape(self) -> bytes:
        """As `exposition`, but only the copy of the numbers runs on the loop.

        Formatting costs ~20 µs per sample (1000 service ports: ~26,000
        samples); in a worker thread it does not stall connections.
        """
        figures = await self.collector.snapshot_in_slices()
        return await asyncio.to_thread(
            generate_latest, _Joined(self._sync_registry, _Frozen(figures)))
