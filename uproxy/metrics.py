"""Prometheus metrics, read from the proxier's plain counters at scrape time.

The data path only adds to ints on `PortStats` (uproxy/stats.py); nothing
here runs per packet or per connection. A custom collector turns those ints
into metric families when `/metrics` is scraped, in its own registry (never
the process-global one, so tests and several apps in one process do not mix).

The runner feeds `SyncMetrics` after each sync; sources feed `SourceMetrics`
when a watch restarts, a relist happens, or a file reload fails.
"""

from __future__ import annotations

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


class SyncMetrics:
    """What the sync runner reports: durations, last success, apply failures."""

    def __init__(self, registry: CollectorRegistry, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.duration = Histogram(
            "uproxy_sync_proxy_rules_duration_seconds",
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
    """Counters sources bump; plain dicts, read at scrape time."""

    watch_restarts: dict[tuple[str, str], int] = field(default_factory=dict)
    relists: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def watch_restarted(self, source: str, resource: str) -> None:
        key = (source, resource)
        self.watch_restarts[key] = self.watch_restarts.get(key, 0) + 1

    def relisted(self, source: str, resource: str) -> None:
        """A full relist, e.g. after 410 Gone."""
        key = (source, resource)
        self.relists[key] = self.relists.get(key, 0) + 1

    def source_error(self, source: str) -> None:
        """A fault the source survived (bad file, failed reload)."""
        self.errors[source] = self.errors.get(source, 0) + 1


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

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*DIAL_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class ProxyCollector(Collector):
    """Yields per service port and global figures from the proxier's state."""

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
        proxier = self._proxier
        applied = proxier.applied
        stats = proxier.stats

        services = GaugeMetricFamily("uproxy_services", "Services with at least one proxied port.")
        services.add_metric([], len({name.service for name in applied}))
        endpoints = GaugeMetricFamily(
            "uproxy_endpoints", "Endpoints summed over service ports.")
        endpoints.add_metric([], sum(len(p.endpoints) for p in applied.values()))
        listeners = GaugeMetricFamily("uproxy_listeners", "Listeners bound.")
        listeners.add_metric([], len(proxier.bound))
        unserved = GaugeMetricFamily(
            "uproxy_service_ports_unserved",
            "Service ports without a listener (bind failed, port range exhausted).")
        unserved.add_metric([], len(proxier.errors))
        yield from (services, endpoints, listeners, unserved)

        accepted = CounterMetricFamily(
            "uproxy_connections", "TCP connections accepted.", labels=PORT_LABELS)
        active = GaugeMetricFamily(
            "uproxy_connections_active", "TCP connections open now.", labels=PORT_LABELS)
        failures = CounterMetricFamily(
            "uproxy_connection_failures",
            "Connections (TCP) or datagrams (UDP) not served: dial failed on every attempt, "
            "or no endpoints.",
            labels=(*PORT_LABELS, "reason"))
        byte_count = CounterMetricFamily(
            "uproxy_bytes", "Bytes relayed; in: client to endpoint, out: endpoint to client.",
            labels=(*PORT_LABELS, "direction"))
        dial = HistogramMetricFamily(
            "uproxy_dial_duration_seconds", "Time to connect to an endpoint.",
            labels=PORT_LABELS)
        dial_failed = CounterMetricFamily(
            "uproxy_dial_attempt_failures", "Single dial attempts that failed (before retry).",
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

        backoffs_now: dict[ServicePortName, int] = {}
        for name in sorted(stats):
            port_stats = stats[name]
            desired = applied.get(name)
            number = str(desired.frontend.port) if desired is not None else name.port
            labels = [str(name.service), number, name.protocol]
            backoffs_now[name] = port_stats.accept_backoffs
            active.add_metric(labels, port_stats.connections_active)
            accepted.add_metric(labels, port_stats.connections_accepted)
            failures.add_metric([*labels, "dial"], port_stats.connections_failed)
            failures.add_metric([*labels, "no_endpoints"], port_stats.no_endpoints)
            byte_count.add_metric([*labels, "in"], port_stats.bytes_in)
            byte_count.add_metric([*labels, "out"], port_stats.bytes_out)
            dial_failed.add_metric(labels, port_stats.dial_attempts_failed)
            histogram = self._dial_histogram(name, port_stats)
            dial.add_metric(labels, histogram.buckets(), histogram.total)
            if name.protocol == "UDP":
                udp_active.add_metric(labels, port_stats.udp_sessions_active)
                udp_sessions.add_metric([*labels, "created"], port_stats.udp_sessions_created)
                udp_sessions.add_metric([*labels, "expired"], port_stats.udp_sessions_expired)
                udp_dropped.add_metric(labels, port_stats.udp_datagrams_dropped)
            for endpoint, count in sorted(port_stats.picks.items()):
                picks.add_metric([*labels, endpoint], count)
        for name in set(self._dial) - set(stats):
            del self._dial[name]
        yield from (accepted, active, failures, byte_count, dial, dial_failed,
                    udp_active, udp_sessions, udp_dropped, picks)

        for name, seen in self._backoffs_seen.items():
            if name not in backoffs_now:
                self._backoffs_retired += seen
        self._backoffs_seen = backoffs_now
        backoffs = CounterMetricFamily(
            "uproxy_accept_backoffs",
            "Times a listener paused accepting because file descriptors ran out (EMFILE).")
        backoffs.add_metric([], self._backoffs_retired + sum(backoffs_now.values()))
        yield backoffs

        restarts = CounterMetricFamily(
            "uproxy_source_watch_restarts", "Watches that ended and were restarted.",
            labels=("source", "resource"))
        for (source, resource), count in sorted(self._sources.watch_restarts.items()):
            restarts.add_metric([source, resource], count)
        relists = CounterMetricFamily(
            "uproxy_source_relists", "Full relists (e.g. after 410 Gone).",
            labels=("source", "resource"))
        for (source, resource), count in sorted(self._sources.relists.items()):
            relists.add_metric([source, resource], count)
        errors = CounterMetricFamily(
            "uproxy_source_errors", "Source faults survived (bad services file, failed reload).",
            labels=("source",))
        for source, count in sorted(self._sources.errors.items()):
            errors.add_metric([source], count)
        yield from (restarts, relists, errors)

    def _dial_histogram(self, name: ServicePortName, port_stats: PortStats) -> _DialHistogram:
        histogram = self._dial.get(name)
        if histogram is None:
            histogram = self._dial[name] = _DialHistogram()
        if port_stats.dial_latencies:
            # Swap, not copy: the relay appends to the new list from now on.
            samples, port_stats.dial_latencies = port_stats.dial_latencies, []
            histogram.add(samples)
        return histogram


class Metrics:
    """The registry behind `/metrics`, and the hooks that feed it."""

    def __init__(self, proxier: StatusInputs, wall: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.sync = SyncMetrics(self.registry, wall)
        self.sources = SourceMetrics()
        self.collector = ProxyCollector(proxier, self.sources)
        self.registry.register(self.collector)

    def exposition(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)
