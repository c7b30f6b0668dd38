"""Kubernetes object dicts -> model objects (pure; no I/O).

`service_from_dict` and `slice_from_dict` read what `kubectl get -o yaml|json`
prints and what the Kubernetes API returns as JSON; `short_form_from_dict`
reads the services file's short form. All three are strict about the types of
the fields they read, tolerate absent optional fields (and `null`, which
kubectl prints for empty lists), and ignore every field they do not read.

A problem raises `ObjectError`, whose `str()` is one line:
``services.yaml:12: spec.ports[0].port: must be an integer 1-65535, got 'http'``.
`ObjectError.path` keeps the field path as a tuple so a caller holding the
YAML node tree can point at the exact line.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

from uproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    PROXY_PROTOCOL_ANNOTATION,
    EndpointPort,
    EndpointSlice,
    Node,
    ObjectName,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)

FieldPath = tuple[str | int, ...]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_NOT_IN_NAMES = re.compile(r"[/\s]")  # \s is what str.isspace() calls a space
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")
AFFINITIES = ("None", "ClientIP")
TRAFFIC_POLICIES = ("Cluster", "Local")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
IP_FAMILIES = ("IPv4", "IPv6")
MAX_AFFINITY_TIMEOUT = 86400  # Kubernetes' validation limit for timeoutSeconds

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# Big files repeat the same few addresses (node IPs, one backend): parse each once.
_ip_address = functools.lru_cache(maxsize=65536)(ipaddress.ip_address)


def format_path(path: FieldPath) -> str:
    """("spec", "ports", 0, "port") -> 'spec.ports[0].port'; odd keys are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f'["{part}"]'
    return text


class ObjectError(ValueError):
    """A field of an object is wrong; `str()` is `where: field: reason`."""

    def __init__(
        self, where: str, field_path: str, reason: str, path: FieldPath = ()
    ) -> None:
        self.where = where
        self.field_path = field_path
        self.reason = reason
        self.path = path
        super().__init__(where, field_path, reason)

    def __str__(self) -> str:
        return ": ".join(part for part in (self.where, self.field_path, self.reason) if part)


def describe(value: object) -> str:
    """How a wrong value is shown in an error: 'http', 70000, a list, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, Sequence):
        return "a list"
    return f"a {type(value).__name__}"


class _Reader:
    """Typed field access that raises ObjectError with the field's path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: FieldPath, reason: str) -> NoReturn:
        raise ObjectError(self.where, format_path(path), reason, path)

    def mapping(self, value: object, path: FieldPath) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a mapping, got {describe(value)}")
        return value

    def list(self, value: object, path: FieldPath) -> Sequence[Any]:
        if value is None:
            return ()
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            self.fail(path, f"must be a list, got {describe(value)}")
        return value

    def string(self, value: object, path: FieldPath, default: str | None = None) -> str:
        if value is None and default is not None:
            return default
        if not isinstance(value, str):
            what = "is required" if value is None else f"must be a string, got {describe(value)}"
            self.fail(path, what)
        return value

    def name(self, value: object, path: FieldPath, default: str | None = None) -> str:
        text = self.string(value, path, default)
        if not text or _NOT_IN_NAMES.search(text):
            self.fail(path, f"must be a non-empty name without '/' or spaces, got {describe(text)}")
        return text

    def choice(
        self, value: object, path: FieldPath, choices: Sequence[str], default: str | None
    ) -> str:
        if value is None and default is not None:
            return default
        if value not in choices:
            options = ", ".join(choices[:-1]) + " or " + choices[-1]
            self.fail(path, f"must be {options}, got {describe(value)}")
        assert isinstance(value, str)
        return value

    def integer(self, value: object, path: FieldPath, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, f"must be an integer {low}-{high}, got {describe(value)}")
        return value

    def port(self, value: object, path: FieldPath) -> int:
        return self.integer(value, path, 1, 65535)

    def boolean(self, value: object, path: FieldPath, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {describe(value)}")
        return value

    def ip(self, value: object, path: FieldPath, family: int | None = None) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be an IP address, got {describe(value)}")
        try:
            address = _ip_address(value)
        except ValueError:
            self.fail(path, f"must be an IP address, got {describe(value)}")
        if family is not None and address.version != family:
            self.fail(path, f"must be an IPv{family} address, got {describe(value)}")
        return str(address)

    def ips(self, value: object, path: FieldPath) -> tuple[str, ...]:
        return tuple(
            self.ip(item, (*path, i)) for i, item in enumerate(self.list(value, path))
        )

    def labels(self, value: object, path: FieldPath) -> Mapping[str, str]:
        labels: dict[str, str] = {}
        for key, label in self.mapping(value, path).items():
            if not isinstance(key, str):
                self.fail(path, f"label names must be strings, got {describe(key)}")
            labels[key] = self.string(label, (*path, key))
        return MappingProxyType(labels)


def _target_port(reader: _Reader, value: object, path: FieldPath) -> int | str:
    if value is None:
        return 0
    if isinstance(value, str):
        if value and not value.isdigit() and value == value.strip():
            return value
        reader.fail(path, f"must be an integer 1-65535 or a port name, got {describe(value)}")
    if isinstance(value, int) and value == 0 and not isinstance(value, bool):
        return 0
    return reader.port(value, path)


def _check_port_names(reader: _Reader, names: Sequence[str], base: FieldPath) -> None:
    seen: set[str] = set()
    for index, port_name in enumerate(names):
        if not port_name and len(names) > 1:
            reader.fail((*base, index, "name"), "is required when there is more than one port")
        if port_name in seen:
            reader.fail((*base, index, "name"), f"duplicate port name {port_name!r}")
        seen.add(port_name)


def _metadata(read: _Reader, d: Mapping[str, Any]) -> tuple[str, str, Mapping[str, str]]:
    """namespace (default "default"), name and labels of an object's metadata."""
    meta = read.mapping(d.get("metadata"), ("metadata",))
    namespace = read.name(meta.get("namespace"), ("metadata", "namespace"), "default")
    name = read.name(meta.get("name"), ("metadata", "name"))
    return namespace, name, read.labels(meta.get("labels"), ("metadata", "labels"))


def service_from_dict(d: Mapping[str, Any], where: str) -> Service:
    """A v1 Service (kubectl output or API JSON) as a model Service."""
    read = _Reader(where)
    d = read.mapping(d, ())
    namespace, name, labels = _metadata(read, d)
    annotations = read.labels(read.mapping(d.get("metadata"), ("metadata",)).get("annotations"),
                              ("metadata", "annotations"))
    spec = read.mapping(d.get("spec"), ("spec",))
    service_type = read.choice(spec.get("type"), ("spec", "type"), SERVICE_TYPES, "ClusterIP")

    ports: list[ServicePortSpec] = []
    for index, raw in enumerate(read.list(spec.get("ports"), ("spec", "ports"))):
        at: FieldPath = ("spec", "ports", index)
        entry = read.mapping(raw, at)
        node_port = entry.get("nodePort")
        ports.append(
            ServicePortSpec(
                name=read.string(entry.get("name"), (*at, "name"), ""),
                port=read.port(entry.get("port"), (*at, "port")),
                protocol=read.choice(
                    entry.get("protocol"), (*at, "protocol"), PORT_PROTOCOLS, "TCP"
                ),
                target_port=_target_port(read, entry.get("targetPort"), (*at, "targetPort")),
                node_port=None if node_port is None else read.port(node_port, (*at, "nodePort")),
            )
        )
    _check_port_names(read, [p.name for p in ports], ("spec", "ports"))

    cluster_ips = _cluster_ips(read, spec)
    for index, family in enumerate(read.list(spec.get("ipFamilies"), ("spec", "ipFamilies"))):
        read.choice(family, ("spec", "ipFamilies", index), IP_FAMILIES, None)

    affinity = read.choice(
        spec.get("sessionAffinity"), ("spec", "sessionAffinity"), AFFINITIES, "None"
    )
    affinity_path: FieldPath = ("spec", "sessionAffinityConfig")
    client_ip = read.mapping(
        read.mapping(spec.get("sessionAffinityConfig"), affinity_path).get("clientIP"),
        (*affinity_path, "clientIP"),
    )
    timeout = client_ip.get("timeoutSeconds")
    affinity_timeout = (
        DEFAULT_AFFINITY_TIMEOUT
        if timeout is None
        else read.integer(
            timeout, (*affinity_path, "clientIP", "timeoutSeconds"), 1, MAX_AFFINITY_TIMEOUT
        )
    )

    status = read.mapping(d.get("status"), ("status",))
    balancer = read.mapping(status.get("loadBalancer"), ("status", "loadBalancer"))
    ingress_path: FieldPath = ("status", "loadBalancer", "ingress")
    load_balancer_ips: list[str] = []
    for index, raw in enumerate(read.list(balancer.get("ingress"), ingress_path)):
        ingress = read.mapping(raw, (*ingress_path, index))
        if ingress.get("ip") is not None:  # hostname-only ingress has no IP to portal
            load_balancer_ips.append(read.ip(ingress["ip"], (*ingress_path, index, "ip")))

    return Service(
        namespace=namespace,
        name=name,
        ports=tuple(ports),
        type=service_type,
        cluster_ips=cluster_ips,
        external_ips=read.ips(spec.get("externalIPs"), ("spec", "externalIPs")),
        load_balancer_ips=tuple(load_balancer_ips),
        session_affinity=affinity,
        affinity_timeout=affinity_timeout,
        internal_traffic_policy=read.choice(
            spec.get("internalTrafficPolicy"), ("spec", "internalTrafficPolicy"),
            TRAFFIC_POLICIES, "Cluster",
        ),
        external_traffic_policy=read.choice(
            spec.get("externalTrafficPolicy"), ("spec", "externalTrafficPolicy"),
            TRAFFIC_POLICIES, "Cluster",
        ),
        labels=labels,
        proxy_protocol=annotations.get(PROXY_PROTOCOL_ANNOTATION, ""),
        health_check_node_port=None if spec.get("healthCheckNodePort") is None
        else read.port(spec["healthCheckNodePort"], ("spec", "healthCheckNodePort")),
    )


def _cluster_ip(read: _Reader, value: object, path: FieldPath) -> str:
    if value in ("None", ""):
        assert isinstance(value, str)
        return value
    return read.ip(value, path)


def _cluster_ips(read: _Reader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.clusterIPs when given (dual stack), else spec.clusterIP; they must agree."""
    single = spec.get("clusterIP")
    if single is not None:
        single = _cluster_ip(read, single, ("spec", "clusterIP"))
    listed = tuple(
        _cluster_ip(read, ip, ("spec", "clusterIPs", i))
        for i, ip in enumerate(read.list(spec.get("clusterIPs"), ("spec", "clusterIPs")))
    )
    if listed:
        if single is not None and single != listed[0]:
            read.fail(
                ("spec", "clusterIPs", 0),
                f"must equal spec.clusterIP {single!r}, got {listed[0]!r}",
            )
        return listed
    return (single,) if single else ()


def _hint_names(read: _Reader, entry: Mapping[str, Any], at: FieldPath,
                which: str) -> tuple[str, ...]:
    """hints.forZones[].name or hints.forNodes[].name of a slice endpoint."""
    hints_at: FieldPath = (*at, "hints")
    hints = read.mapping(entry.get("hints"), hints_at)
    names = []
    for index, raw in enumerate(read.list(hints.get(which), (*hints_at, which))):
        item = read.mapping(raw, (*hints_at, which, index))
        names.append(read.string(item.get("name"), (*hints_at, which, index, "name")))
    return tuple(names)


ZONE_LABEL = "topology.kubernetes.io/zone"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_from_dict(d: Mapping[str, Any], where: str) -> Node:
    """A v1 Node: its name, zone, and whether it is going away."""
    read = _Reader(where)
    d = read.mapping(d, ())
    meta = read.mapping(d.get("metadata"), ("metadata",))
    name = read.name(meta.get("name"), ("metadata", "name"))
    labels = read.labels(meta.get("labels"), ("metadata", "labels"))
    spec = read.mapping(d.get("spec"), ("spec",))
    taints = [read.mapping(t, ("spec", "taints", i))
              for i, t in enumerate(read.list(spec.get("taints"), ("spec", "taints")))]
    terminating = meta.get("deletionTimestamp") is not None or any(
        taint.get("key") == TO_BE_DELETED_TAINT for taint in taints)
    return Node(name, labels.get(ZONE_LABEL, ""), terminating)


def _pod_of(read: _Reader, value: object, path: FieldPath, namespace: str) -> str:
    """'namespace/name' of a targetRef of kind Pod; '' for none or another kind."""
    if value is None:
        return ""
    ref = read.mapping(value, path)
    if ref.get("kind") != "Pod" or ref.get("name") in (None, ""):
        return ""
    name = read.string(ref.get("name"), (*path, "name"))
    pod_namespace = read.string(ref.get("namespace"), (*path, "namespace"), namespace)
    return f"{pod_namespace}/{name}"


def slice_from_dict(d: Mapping[str, Any], where: str) -> EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice (kubectl output or API JSON) as a model slice."""
    read = _Reader(where)
    d = read.mapping(d, ())
    namespace, name, labels = _metadata(read, d)
    service_name = read.name(
        labels.get(SERVICE_NAME_LABEL), ("metadata", "labels", SERVICE_NAME_LABEL)
    )
    address_type = read.choice(d.get("addressType"), ("addressType",), ADDRESS_TYPES, None)
    family = {"IPv4": 4, "IPv6": 6}.get(address_type)

    ports: list[EndpointPort] = []
    for index, raw in enumerate(read.list(d.get("ports"), ("ports",))):
        at: FieldPath = ("ports", index)
        entry = read.mapping(raw, at)
        number = entry.get("port")  # null means "all ports"; nothing a proxy can dial
        ports.append(
            EndpointPort(
                name=read.string(entry.get("name"), (*at, "name"), ""),
                port=0 if number is None else read.port(number, (*at, "port")),
                protocol=read.choice(
                    entry.get("protocol"), (*at, "protocol"), PORT_PROTOCOLS, "TCP"
                ),
            )
        )

    endpoints: list[SliceEndpoint] = []
    for index, raw in enumerate(read.list(d.get("endpoints"), ("endpoints",))):
        at = ("endpoints", index)
        entry = read.mapping(raw, at)
        raw_addresses = read.list(entry.get("addresses"), (*at, "addresses"))
        if not raw_addresses:
            read.fail((*at, "addresses"), "needs at least one address")
        addresses = tuple(
            read.string(a, (*at, "addresses", i)) if family is None
            else read.ip(a, (*at, "addresses", i), family)
            for i, a in enumerate(raw_addresses)
        )
        conditions = read.mapping(entry.get("conditions"), (*at, "conditions"))
        # Kubernetes: ready nil means ready; serving nil means "same as ready".
        ready = read.boolean(conditions.get("ready"), (*at, "conditions", "ready"), True)
        serving = read.boolean(conditions.get("serving"), (*at, "conditions", "serving"), ready)
        terminating = read.boolean(
            conditions.get("terminating"), (*at, "conditions", "terminating"), False
        )
        node_name = entry.get("nodeName")
        endpoints.append(
            SliceEndpoint(
                addresses=addresses,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=None if node_name is None
                else read.string(node_name, (*at, "nodeName")),
                pod=_pod_of(read, entry.get("targetRef"), (*at, "targetRef"), namespace),
                zone_hints=_hint_names(read, entry, at, "forZones"),
                node_hints=_hint_names(read, entry, at, "forNodes"),
            )
        )

    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


# -- the short form ---------------------------------------------------------

_SHORT_SERVICE_KEYS = frozenset({
    "name", "namespace", "clusterIP", "clusterIPs", "type", "sessionAffinity",
    "sessionAffinityTimeout", "externalIPs", "ports", "endpoints", "labels",
    "internalTrafficPolicy", "externalTrafficPolicy", "proxyProtocol",
})
_SHORT_PORT_KEYS = frozenset({"name", "port", "targetPort", "protocol", "nodePort"})
_ENDPOINT_HINT = "like 10.0.0.1, 10.0.0.1:8080 or '[fd00::1]:8080'"


def parse_endpoint(text: str) -> tuple[str, int | None]:
    """'ip', 'ip:port', '[v6]' or '[v6]:port' -> (ip, port or None); ValueError if not."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(text)
        address = _ip_address(host)
        if address.version != 6:
            raise ValueError(text)
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        address = _ip_address(host)
        if address.version != 4:
            raise ValueError(text)
    else:
        address = _ip_address(text)  # a bare IPv4 or IPv6 address
        port_text = None
    if port_text is None:
        return str(address), None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(text)
    return str(address), int(port_text)


def _check_keys(read: _Reader, entry: Mapping[str, Any], allowed: frozenset[str],
                path: FieldPath) -> None:
    for key in entry:
        if key not in allowed:
            options = ", ".join(sorted(allowed))
            read.fail((*path, str(key)), f"unknown field (known: {options})")


class Memo:
    """What the last load converted, by each entry's kind and name, with the
    entry as it was read: a reload converts only the entries that differ.

    Comparing two parsed entries is one dict comparison in C (a few µs);
    converting one is ~50 µs of Python, so a one-service edit of a
    10k-service file costs one conversion. Entries of Kubernetes objects are
    kept without `metadata.managedFields`, which uproxy never reads and which
    would otherwise hold most of a kubectl dump's memory.
    """

    def __init__(self) -> None:
        self._previous: dict[tuple[str, Any, Any], tuple[Any, Any]] = {}
        self._current: dict[tuple[str, Any, Any], tuple[Any, Any]] = {}

    @staticmethod
    def key(kind: str, entry: Any) -> tuple[str, Any, Any] | None:
        """(kind, namespace, name) as written, or None when it cannot be told."""
        if type(entry) is not dict:
            return None
        meta = entry.get("metadata") if kind != "short" else entry
        if type(meta) is not dict:
            return None
        namespace, name = meta.get("namespace"), meta.get("name")
        if type(name) is not str or (namespace is not None and type(namespace) is not str):
            return None
        return (kind, namespace, name)

    @staticmethod
    def comparable(kind: str, entry: dict[str, Any]) -> dict[str, Any]:
        if kind == "short":
            return entry
        meta = entry.get("metadata")
        if type(meta) is not dict or "managedFields" not in meta:
            return entry
        return {**entry, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}

    def get(self, kind: str, entry: Any) -> Any:
        """The converted object of an entry equal to this one last time, or None;
        keeps it for next time either way (see `keep`)."""
        key = self.key(kind, entry)
        if key is None:
            return None
        hit = self._previous.get(key)
        if hit is not None and hit[0] == self.comparable(kind, entry):
            self._current[key] = hit
            return hit[1]
        return None

    def keep(self, kind: str, entry: Any, converted: Any) -> None:
        key = self.key(kind, entry)
        if key is not None:
            self._current[key] = (self.comparable(kind, entry), converted)

    def done(self) -> None:
        """A load succeeded: what it converted is what the next compares with."""
        self._previous, self._current = self._current, {}

    def failed(self) -> None:
        """A load failed: forget its half; the last good load's entries stay."""
        self._current = {}


class ShortEntry(NamedTuple):
    """One entry of the short form, converted: its service, its slices, and why
    some of its endpoints will never be used (`family_mismatch`), or None."""

    service: Service
    slices: tuple[EndpointSlice, ...]
    mismatch: str | None


def short_form_from_dict(
    d: Mapping[str, Any], where: str, memo: Memo | None = None,
) -> tuple[list[Service], list[EndpointSlice]]:
    """The short form (`services: [...]`) as Services and their EndpointSlices.

    Each service gets one slice per address family (IPv4, IPv6) for its plain
    `ip` endpoints; `ip:port` endpoints (single-port services only) go to a
    slice per family and port, named `<service>-ipv4-<port>`.
    """
    entries = short_form_entries(d, where, memo)
    return ([entry.service for entry in entries],
            [endpoint_slice for entry in entries for endpoint_slice in entry.slices])


def short_form_entries(
    d: Mapping[str, Any], where: str, memo: Memo | None = None,
) -> list[ShortEntry]:
    """The short form's entries in order, one per `services[i]`. With `memo`, an
    entry equal to one of the last load is not converted (nor judged) again."""
    read = _Reader(where)
    d = read.mapping(d, ())
    _check_keys(read, d, frozenset({"services"}), ())
    if d.get("services") is None:
        read.fail(("services",), "is required (write 'services: []' for none)")
    entries: list[ShortEntry] = []
    seen: dict[ObjectName, int] = {}
    for index, raw in enumerate(read.list(d["services"], ("services",))):
        entry: ShortEntry | None = memo.get("short", raw) if memo is not None else None
        if entry is None:
            at: FieldPath = ("services", index)
            service, slices = _short_service(read, read.mapping(raw, at), at)
            entry = ShortEntry(service, tuple(slices), family_mismatch(service, slices))
            if memo is not None:
                memo.keep("short", raw, entry)
        key = entry.service.key
        if key in seen:
            read.fail(("services", index, "name"),
                      f"duplicate service {key} (also services[{seen[key]}])")
        seen[key] = index
        entries.append(entry)
    return entries


def _short_service(
    read: _Reader, entry: Mapping[str, Any], at: FieldPath
) -> tuple[Service, list[EndpointSlice]]:
    _check_keys(read, entry, _SHORT_SERVICE_KEYS, at)
    name = read.name(entry.get("name"), (*at, "name"))
    namespace = read.name(entry.get("namespace"), (*at, "namespace"), "default")

    raw_ports = read.list(entry.get("ports"), (*at, "ports"))
    if not raw_ports:
        read.fail((*at, "ports"), "needs at least one port")
    ports: list[ServicePortSpec] = []
    for index, raw in enumerate(raw_ports):
        port_at: FieldPath = (*at, "ports", index)
        port_entry = read.mapping(raw, port_at)
        _check_keys(read, port_entry, _SHORT_PORT_KEYS, port_at)
        target = port_entry.get("targetPort")
        node_port = port_entry.get("nodePort")
        ports.append(
            ServicePortSpec(
                name=read.string(port_entry.get("name"), (*port_at, "name"), ""),
                port=read.port(port_entry.get("port"), (*port_at, "port")),
                protocol=read.choice(
                    port_entry.get("protocol"), (*port_at, "protocol"), PORT_PROTOCOLS, "TCP"
                ),
                # No pods here to name ports, so a targetPort is a number.
                target_port=0 if target is None else read.port(target, (*port_at, "targetPort")),
                node_port=None if node_port is None
                else read.port(node_port, (*port_at, "nodePort")),
            )
        )
    _check_port_names(read, [p.name for p in ports], (*at, "ports"))

    has_node_ports = any(p.node_port is not None for p in ports)
    service_type = read.choice(
        entry.get("type"), (*at, "type"), SERVICE_TYPES[:3],
        "NodePort" if has_node_ports else "ClusterIP",
    )
    if service_type == "ClusterIP" and has_node_ports:
        read.fail((*at, "type"), "ClusterIP services have no nodePort; use NodePort")

    spec: dict[str, Any] = {
        "clusterIP": entry.get("clusterIP"), "clusterIPs": entry.get("clusterIPs"),
    }
    try:
        cluster_ips = _cluster_ips(_Reader(read.where), spec)
    except ObjectError as error:  # re-anchor spec.* paths at this short-form entry
        read.fail((*at, *error.path[1:]), error.reason)

    timeout = entry.get("sessionAffinityTimeout")
    service = Service(
        namespace=namespace,
        name=name,
        ports=tuple(ports),
        type=service_type,
        cluster_ips=cluster_ips,
        external_ips=read.ips(entry.get("externalIPs"), (*at, "externalIPs")),
        session_affinity=read.choice(
            entry.get("sessionAffinity"), (*at, "sessionAffinity"), AFFINITIES, "None"
        ),
        affinity_timeout=DEFAULT_AFFINITY_TIMEOUT if timeout is None
        else read.integer(timeout, (*at, "sessionAffinityTimeout"), 1, MAX_AFFINITY_TIMEOUT),
        internal_traffic_policy=read.choice(
            entry.get("internalTrafficPolicy"), (*at, "internalTrafficPolicy"),
            TRAFFIC_POLICIES, "Cluster",
        ),
        external_traffic_policy=read.choice(
            entry.get("externalTrafficPolicy"), (*at, "externalTrafficPolicy"),
            TRAFFIC_POLICIES, "Cluster",
        ),
        labels=read.labels(entry.get("labels"), (*at, "labels")),
        proxy_protocol=read.string(entry.get("proxyProtocol"), (*at, "proxyProtocol"), ""),
    )
    return service, _short_slices(read, entry, at, service)


def family_mismatch(service: Service, slices: Sequence[EndpointSlice]) -> str | None:
    """Why endpoints of `service` will never be used for their IP family, or None.

    As in Kubernetes, a service uses only the slices of its own IP families:
    those of its cluster IPs (none given: both). Endpoints of the other family
    are silently not used, so an IPv6-only service with IPv4 endpoints has
    none; the file source says so as a warning.
    """
    families = {_ip_address(ip).version for ip in service.cluster_ips if ip not in ("", "None")}
    counts: dict[int, int] = {}
    for endpoint_slice in slices:
        family = {"IPv4": 4, "IPv6": 6}.get(endpoint_slice.address_type)
        if family is not None:
            counts[family] = counts.get(family, 0) + len(endpoint_slice.endpoints)
    total = sum(counts.values())
    if not families or len(families) > 1 or not total:
        return None
    (own,) = families
    other = 6 if own == 4 else 4
    unused = counts.get(other, 0)
    if not unused:
        return None
    clause = f"but the service is IPv{own} only (clusterIP {service.cluster_ips[0]})"
    if unused == total:
        return f"endpoints are IPv{other} {clause}; it has no endpoints"
    return f"{unused} of {total} endpoints are IPv{other} {clause}; those are not used"


def _short_slices(
    read: _Reader, entry: Mapping[str, Any], at: FieldPath, service: Service
) -> list[EndpointSlice]:
    # (family, explicit port or None) -> addresses, in file order
    groups: dict[tuple[int, int | None], list[str]] = {}
    seen: dict[tuple[str, int | None], int] = {}
    for index, raw in enumerate(read.list(entry.get("endpoints"), (*at, "endpoints"))):
        endpoint_at: FieldPath = (*at, "endpoints", index)
        if not isinstance(raw, str):
            hint = " (quote IPv6 endpoints)" if isinstance(raw, Sequence | Mapping) else ""
            read.fail(endpoint_at, f"must be a string {_ENDPOINT_HINT}, got {describe(raw)}{hint}")
        try:
            ip, port = parse_endpoint(raw)
        except ValueError:
            read.fail(endpoint_at, f"must be an endpoint {_ENDPOINT_HINT}, got {describe(raw)}")
        if port is not None and len(service.ports) > 1:
            read.fail(
                endpoint_at,
                f"ip:port endpoints need a single-port service; this one has "
                f"{len(service.ports)} ports (write the IP alone and set targetPort)",
            )
        if port is not None and port == (service.ports[0].target_port or service.ports[0].port):
            port = None  # same as the default: same slice as the plain IPs
        if (ip, port) in seen:
            read.fail(endpoint_at, f"duplicate of endpoints[{seen[ip, port]}]")
        seen[ip, port] = index
        family: int = _ip_address(ip).version
        groups.setdefault((family, port), []).append(ip)

    slices: list[EndpointSlice] = []
    for (family, port), addresses in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0)):
        if port is None:
            endpoint_ports = tuple(
                EndpointPort(
                    p.name, p.target_port if isinstance(p.target_port, int) and p.target_port
                    else p.port, p.protocol,
                )
                for p in service.ports
            )
            slice_name = f"{service.name}-ipv{family}"
        else:
            only = service.ports[0]
            endpoint_ports = (EndpointPort(only.name, port, only.protocol),)
            slice_name = f"{service.name}-ipv{family}-{port}"
        slices.append(
            EndpointSlice(
                namespace=service.namespace,
                name=slice_name,
                service_name=service.name,
                address_type=f"IPv{family}",
                ports=endpoint_ports,
                endpoints=tuple(SliceEndpoint(addresses=(ip,)) for ip in addresses),
            )
        )
    return slices
