"""The model: Kubernetes-shaped objects that sources produce, and the
per-service-port view the proxier plans with.

Everything here is plain, frozen data. Sources turn whatever they read (a
services file, the Kubernetes API) into `Service` and `EndpointSlice`;
`planner.desired_state` turns those into one `DesiredPort` per
`ServicePortName`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

Protocol = Literal["TCP", "UDP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP")

DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, as Kubernetes' sessionAffinityConfig default

# The annotation that asks for a PROXY protocol header to endpoints: "v1" or "v2".
PROXY_PROTOCOL_ANNOTATION = "uproxy/proxy-protocol"

# Label that hands a service to another proxy; kube-proxy skips such services.
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"

_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


class ObjectName(NamedTuple):
    """namespace/name of a Kubernetes object.

    A NamedTuple, not a dataclass: it is the key of every map of objects, and
    a tuple hashes and compares in C (a dataclass's `__hash__` is Python; at
    10k services those calls were a third of a reload).
    """

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    """One entry of a Service's spec.ports."""

    name: str
    port: int
    protocol: str = "TCP"
    target_port: int | str = 0  # 0: same as port; a str is a named port
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """The parts of a v1 Service that a service proxy reads."""

    namespace: str
    name: str
    ports: tuple[ServicePortSpec, ...] = ()
    type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[str, ...] = ()  # ("None",) for headless services
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    session_affinity: str = "None"  # None | ClientIP
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    internal_traffic_policy: str = "Cluster"  # Cluster | Local
    external_traffic_policy: str = "Cluster"  # Cluster | Local
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY_LABELS)
    # The uproxy/proxy-protocol annotation as written ("v1", "v2"; "" when
    # absent); the planner judges it.
    proxy_protocol: str = ""
    # spec.healthCheckNodePort (LoadBalancer with externalTrafficPolicy: Local)
    health_check_node_port: int | None = None
    # namespace/name, made once: every map of services is keyed by it, and a
    # 10k-service reload looked it up ~40k times (a new tuple each time).
    key: ObjectName = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ObjectName(self.namespace, self.name))


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """One entry of an EndpointSlice's ports."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One entry of an EndpointSlice's endpoints."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    pod: str = ""  # targetRef of kind Pod as "namespace/name"; "" when there is none
    # hints.forZones / hints.forNodes (topology-aware routing, trafficDistribution)
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """The parts of a discovery.k8s.io/v1 EndpointSlice that a service proxy reads."""

    namespace: str
    name: str
    service_name: str  # label kubernetes.io/service-name
    address_type: str = "IPv4"  # IPv4 | IPv6 | FQDN (FQDN is ignored)
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()
    # Made once, as Service.key: the keys of the slice maps and of their index.
    key: ObjectName = field(init=False, repr=False, compare=False)
    service: ObjectName = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ObjectName(self.namespace, self.name))
        object.__setattr__(self, "service", ObjectName(self.namespace, self.service_name))


@dataclass(frozen=True, slots=True)
class Node:
    """The parts of this node's v1 Node a service proxy reads."""

    name: str
    zone: str = ""  # label topology.kubernetes.io/zone
    # Being deleted (deletionTimestamp), or drained by the cluster autoscaler
    # (taint ToBeDeletedByClusterAutoscaler): health checks say 503.
    terminating: bool = False

    @property
    def key(self) -> ObjectName:
        return ObjectName("", self.name)


class ServicePortName(NamedTuple):
    """Identifies one port of one service: what a listener serves (a NamedTuple,
    as ObjectName)."""

    namespace: str
    name: str
    port: str  # the port's name; "" for an unnamed single port
    protocol: str = "TCP"

    @property
    def service(self) -> ObjectName:
        return ObjectName(self.namespace, self.name)

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}"


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A backend address a connection can be dialled to.

    `pod` ("namespace/name", from the EndpointSlice's targetRef) is how the
    API server's port-forward reaches it; a new pod at the same address is
    another endpoint.
    """

    ip: str
    port: int
    pod: str = ""

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Frontend:
    """Where a service port is reached: everything listeners and rules need."""

    name: ServicePortName
    port: int
    protocol: str
    cluster_ips: tuple[str, ...] = ()
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    proxy_protocol: int = 0  # PROXY protocol version sent to endpoints; 0: none

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every virtual address a portal is installed for (not node ports)."""
        return self.cluster_ips + self.external_ips + self.load_balancer_ips


@dataclass(frozen=True, slots=True)
class DesiredPort:
    """What one service port should look like after a sync."""

    frontend: Frontend
    endpoints: tuple[Endpoint, ...] = ()
    affinity_timeout: float | None = None  # seconds; None: no ClientIP affinity
    # Endpoints for traffic that arrives from outside (node port, external IP,
    # load-balancer IP) when a traffic policy makes them differ from
    # `endpoints` (which serve the cluster IPs); None when they are the same.
    external_endpoints: tuple[Endpoint, ...] | None = None

    @property
    def name(self) -> ServicePortName:
        return self.frontend.name


# The port name under which a health check node port reaches the rules: port
# names are lower-case DNS labels, so it is never a real port's.
HEALTH_CHECK_PORT = "healthCheckNodePort"


def health_check_name(service: ObjectName) -> ServicePortName:
    """The rules' name of a service's health check node port."""
    return ServicePortName(service.namespace, service.name, HEALTH_CHECK_PORT, "TCP")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A LoadBalancer service with externalTrafficPolicy Local: the node port
    its load balancer probes, and this node's ready endpoints (counted as
    kube-proxy does: once per service port)."""

    node_port: int
    local_endpoints: int


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
