"""Counters the data path keeps per service port, read by metrics and status.

Plain attributes on `__slots__` objects: the relay adds to them when a
connection closes (bytes) or when an event happens (accept, dial failure),
never per chunk; the metrics collector reads them at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class PortStats:
    connections_accepted: int = 0
    connections_active: int = 0
    connections_failed: int = 0  # dial failed on every attempt
    no_endpoints: int = 0  # refused (TCP) or dropped (UDP) for lack of endpoints
    bytes_in: int = 0  # client -> endpoint
    bytes_out: int = 0  # endpoint -> client
    dial_attempts_failed: int = 0  # every failed dial, also one followed by a good failover
    dial_seconds_total: float = 0.0
    dial_latencies: list[float] = field(default_factory=list)  # drained by metrics
    accept_backoffs: int = 0  # EMFILE/ENFILE pauses
    udp_sessions_active: int = 0
    udp_sessions_created: int = 0
    udp_sessions_expired: int = 0
    udp_datagrams_in: int = 0
    udp_datagrams_out: int = 0
    udp_datagrams_dropped: int = 0
    picks: dict[str, int] = field(default_factory=dict)  # endpoint "ip:port" -> picks

    def record_dial(self, seconds: float) -> None:
        self.dial_seconds_total += seconds
        if len(self.dial_latencies) < 10_000:  # bounded if nobody scrapes
            self.dial_latencies.append(seconds)
