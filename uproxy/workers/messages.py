"""What the control process and its workers say to each other: typed, frozen
messages, and their JSON encoding on the wire.

Control -> worker: `PortUpdate` (a port's endpoints, affinity, and external
traffic's own endpoints), `Forget`, `Open` (a listener's socket rides along),
`Close`, `Abort`, `Stop`. Worker -> control: `Stats`. A worker's settings are
a `WorkerConfig`, given on its command line. `decode` turns a frame's body
back into a message or raises MessageError (one line): a bad frame is an
error value, never a broken worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from uproxy.model import Endpoint, ServicePortName
from uproxy.stats import PortStats

# PortStats numbers reported as one list, in this order.
NUMBERS = tuple(f.name for f in fields(PortStats) if f.name not in ("picks", "dial_latencies"))
GAUGES = ("connections_active", "udp_sessions_active")


class MessageError(Exception):
    """A frame whose body is not a message we know; `str()` is one line."""


@dataclass(frozen=True)
class WorkerConfig:
    """A worker's settings (from the control process's Settings)."""

    relay_mode: str = "auto"
    udp_timeout: float = 30.0
    udp_max_sessions: int = 4096
    log_format: str = "text"
    verbose: int = 0
    grace: float = 10.0

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        try:
            raw = json.loads(text)
            return cls(relay_mode=str(raw["relay_mode"]), udp_timeout=float(raw["udp_timeout"]),
                       udp_max_sessions=int(raw["udp_max_sessions"]),
                       log_format=str(raw["log_format"]), verbose=int(raw["verbose"]),
                       grace=float(raw["grace"]))
        except (ValueError, KeyError, TypeError) as error:
            raise MessageError(f"worker config: {error!r}") from None


@dataclass(frozen=True)
class PortUpdate:
    name: ServicePortName
    endpoints: tuple[Endpoint, ...]
    affinity: float | None
    external: tuple[Endpoint, ...] | None = None  # externalTrafficPolicy: Local and the like
    cluster_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Forget:
    name: ServicePortName


@dataclass(frozen=True)
class Open:
    """Serve the listener whose socket comes with this frame."""

    listener_id: int
    name: ServicePortName
    protocol: str
    proxy_protocol: int = 0  # the PROXY header version to send endpoints; 0: none


@dataclass(frozen=True)
class Close:
    listener_id: int


@dataclass(frozen=True)
class Abort:
    listener_id: int


@dataclass(frozen=True)
class Stop:
    grace: float


@dataclass(frozen=True)
class PortReport:
    """One listener's cumulative counters in one worker."""

    numbers: tuple[float, ...]  # in NUMBERS order
    picks: Mapping[str, int] = field(default_factory=dict)
    latencies: tuple[float, ...] = ()  # dial times since the last report


@dataclass(frozen=True)
class Stats:
    ports: Mapping[int, PortReport]  # listener id -> report


Message = PortUpdate | Forget | Open | Close | Abort | Stop | Stats


def _name(name: ServicePortName) -> list[str]:
    return [name.namespace, name.name, name.port, name.protocol]


def _endpoints(endpoints: Sequence[Endpoint]) -> list[list[object]]:
    return [[e.ip, e.port, e.pod] for e in endpoints]


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    if isinstance(message, PortUpdate):
        body = {"op": "port", "name": _name(message.name),
                "endpoints": _endpoints(message.endpoints), "affinity": message.affinity}
        if message.external is not None:
            body["external"] = _endpoints(message.external)
            body["cluster_ips"] = list(message.cluster_ips)
    elif isinstance(message, Forget):
        body = {"op": "forget", "name": _name(message.name)}
    elif isinstance(message, Open):
        body = {"op": "open", "id": message.listener_id, "name": _name(message.name),
                "protocol": message.protocol, "proxy": message.proxy_protocol}
    elif isinstance(message, Close):
        body = {"op": "close", "id": message.listener_id}
    elif isinstance(message, Abort):
        body = {"op": "abort", "id": message.listener_id}
    elif isinstance(message, Stop):
        body = {"op": "stop", "grace": message.grace}
    else:
        body = {"op": "stats", "ports": {
            str(listener_id): {"n": list(report.numbers), "p": dict(report.picks),
                               "d": list(report.latencies)}
            for listener_id, report in message.ports.items()}}
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """The message in a frame's body; MessageError when it is not one."""
    try:
        body = json.loads(data)
        op = body["op"]
        if op == "port":
            external = body.get("external")
            return PortUpdate(
                _name_from(body["name"]), _endpoints_from(body["endpoints"]),
                None if body["affinity"] is None else float(body["affinity"]),
                None if external is None else _endpoints_from(external),
                tuple(str(ip) for ip in body.get("cluster_ips", ())))
        if op == "forget":
            return Forget(_name_from(body["name"]))
        if op == "open":
            return Open(int(body["id"]), _name_from(body["name"]), str(body["protocol"]),
                        int(body.get("proxy", 0)))
        if op == "close":
            return Close(int(body["id"]))
        if op == "abort":
            return Abort(int(body["id"]))
        if op == "stop":
            return Stop(float(body["grace"]))
        if op == "stats":
            return Stats({int(key): PortReport(
                tuple(float(n) for n in entry["n"]),
                {str(k): int(v) for k, v in entry.get("p", {}).items()},
                tuple(float(d) for d in entry.get("d", ())))
                for key, entry in body["ports"].items()})
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise MessageError(f"a bad message: {error!r}") from None
    raise MessageError(f"an unknown message {op!r}")


def _name_from(value: Sequence[str]) -> ServicePortName:
    namespace, name, port, protocol = (str(part) for part in value)
    return ServicePortName(namespace, name, port, protocol)


def _endpoints_from(value: Sequence[Sequence[Any]]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(str(ip), int(port), str(pod)) for ip, port, pod in value)
