"""Kubernetes object dicts and the short form -> model objects."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.model import EndpointPort, Node, Service, ServicePortSpec, SliceEndpoint
from uproxy.planner import desired_state
from uproxy.sources.objects import (
    ObjectError,
    format_path,
    node_from_dict,
    parse_endpoint,
    service_from_dict,
    short_form_from_dict,
    slice_from_dict,
)


def service_dict() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9090},
            ],
        },
    }


def slice_dict() -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": "web-abcde",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": True}}],
    }


# -- Service ------------------------------------------------------------------


def test_service_fields_are_read() -> None:
    d = service_dict()
    d["spec"].update({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "externalIPs": ["198.18.7.7"],
        "internalTrafficPolicy": "Local",
        "externalTrafficPolicy": "Local",
        "ipFamilies": ["IPv4"],
    })
    d["status"] = {"loadBalancer": {"ingress": [{"ip": "172.18.255.200"}, {"hostname": "x"}]}}

    service = service_from_dict(d, "here")

    assert service.key.namespace == "shop" and service.name == "web"
    assert service.ports == (
        ServicePortSpec("http", 80, "TCP", "http", None),
        ServicePortSpec("metrics", 9090, "TCP", 9090, None),
    )
    assert service.cluster_ips == ("10.96.0.10",)
    assert service.external_ips == ("198.18.7.7",)
    assert service.load_balancer_ips == ("172.18.255.200",)
    assert service.session_affinity == "ClientIP" and service.affinity_timeout == 600
    assert service.internal_traffic_policy == "Local"
    assert service.external_traffic_policy == "Local"
    assert dict(service.labels) == {"app": "web"}


def test_service_defaults_for_absent_optional_fields() -> None:
    service = service_from_dict({"metadata": {"name": "bare"}, "spec": {}}, "here")

    assert service == Service(namespace="default", name="bare")
    assert service.affinity_timeout == 10800


def test_service_tolerates_nulls_and_unknown_fields() -> None:
    d = service_dict()
    d["spec"]["externalIPs"] = None
    d["spec"]["somethingNew"] = {"x": 1}
    d["metadata"]["labels"] = None
    d["status"] = {"loadBalancer": {}, "conditions": None}

    service = service_from_dict(d, "here")

    assert service.external_ips == () and dict(service.labels) == {}


def test_service_node_ports_and_dual_stack() -> None:
    d = service_dict()
    d["spec"]["type"] = "NodePort"
    d["spec"]["clusterIPs"] = ["10.96.0.10", "fd00:10:96::a"]
    d["spec"]["ports"][0]["nodePort"] = 30080

    service = service_from_dict(d, "here")

    assert service.type == "NodePort"
    assert service.ports[0].node_port == 30080 and service.ports[1].node_port is None
    assert service.cluster_ips == ("10.96.0.10", "fd00:10:96::a")


def test_headless_and_external_name_services_load() -> None:
    headless = service_dict()
    headless["spec"]["clusterIP"] = "None"
    headless["spec"]["clusterIPs"] = ["None"]
    external = {"metadata": {"name": "api"}, "spec": {"type": "ExternalName",
                                                      "externalName": "api.example.com"}}

    assert service_from_dict(headless, "here").cluster_ips == ("None",)
    assert service_from_dict(external, "here").type == "ExternalName"


def _set(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target: Any = d
    parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split("/")]
    for part in parts[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec/ports/0/port", "http",
         "f.yaml:3: spec.ports[0].port: must be an integer 1-65535, got 'http'"),
        ("spec/ports/0/port", 70000,
         "f.yaml:3: spec.ports[0].port: must be an integer 1-65535, got 70000"),
        ("spec/ports/0/port", True,
         "f.yaml:3: spec.ports[0].port: must be an integer 1-65535, got true"),
        ("spec/ports/0/port", _DELETE,
         "f.yaml:3: spec.ports[0].port: must be an integer 1-65535, got null"),
        ("spec/ports/0/protocol", "tcp",
         "f.yaml:3: spec.ports[0].protocol: must be TCP, UDP or SCTP, got 'tcp'"),
        ("spec/ports/0/targetPort", "8080",
         "f.yaml:3: spec.ports[0].targetPort: must be an integer 1-65535 or a port name, "
         "got '8080'"),
        ("spec/ports/0/targetPort", 65536,
         "f.yaml:3: spec.ports[0].targetPort: must be an integer 1-65535, got 65536"),
        ("spec/ports/0/nodePort", "x",
         "f.yaml:3: spec.ports[0].nodePort: must be an integer 1-65535, got 'x'"),
        ("spec/ports/1/name", "http",
         "f.yaml:3: spec.ports[1].name: duplicate port name 'http'"),
        ("spec/ports/1/name", _DELETE,
         "f.yaml:3: spec.ports[1].name: is required when there is more than one port"),
        ("spec/ports/0", "http",
         "f.yaml:3: spec.ports[0]: must be a mapping, got 'http'"),
        ("spec/ports", {"port": 80},
         "f.yaml:3: spec.ports: must be a list, got a mapping"),
        ("spec", [],
         "f.yaml:3: spec: must be a mapping, got a list"),
        ("spec/type", "Balanced",
         "f.yaml:3: spec.type: must be ClusterIP, NodePort, LoadBalancer or ExternalName, "
         "got 'Balanced'"),
        ("spec/clusterIP", "10.96.0.300",
         "f.yaml:3: spec.clusterIP: must be an IP address, got '10.96.0.300'"),
        ("spec/clusterIPs", ["10.96.0.11"],
         "f.yaml:3: spec.clusterIPs[0]: must equal spec.clusterIP '10.96.0.10', "
         "got '10.96.0.11'"),
        ("spec/clusterIPs", "10.96.0.10",
         "f.yaml:3: spec.clusterIPs: must be a list, got '10.96.0.10'"),
        ("spec/externalIPs", ["198.18.0.1", "example.com"],
         "f.yaml:3: spec.externalIPs[1]: must be an IP address, got 'example.com'"),
        ("spec/sessionAffinity", "Cookie",
         "f.yaml:3: spec.sessionAffinity: must be None or ClientIP, got 'Cookie'"),
        ("spec/sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 0}},
         "f.yaml:3: spec.sessionAffinityConfig.clientIP.timeoutSeconds: "
         "must be an integer 1-86400, got 0"),
        ("spec/internalTrafficPolicy", "local",
         "f.yaml:3: spec.internalTrafficPolicy: must be Cluster or Local, got 'local'"),
        ("spec/externalTrafficPolicy", 1,
         "f.yaml:3: spec.externalTrafficPolicy: must be Cluster or Local, got 1"),
        ("spec/ipFamilies", ["IPv5"],
         "f.yaml:3: spec.ipFamilies[0]: must be IPv4 or IPv6, got 'IPv5'"),
        ("metadata/name", _DELETE, "f.yaml:3: metadata.name: is required"),
        ("metadata/name", "a/b",
         "f.yaml:3: metadata.name: must be a non-empty name without '/' or spaces, got 'a/b'"),
        ("metadata/namespace", 7, "f.yaml:3: metadata.namespace: must be a string, got 7"),
        ("metadata/labels", {"version": 1},
         "f.yaml:3: metadata.labels.version: must be a string, got 1"),
        ("metadata/labels", {"app.kubernetes.io/name": None},
         'f.yaml:3: metadata.labels["app.kubernetes.io/name"]: is required'),
        ("status", {"loadBalancer": {"ingress": [{"ip": "lb"}]}},
         "f.yaml:3: status.loadBalancer.ingress[0].ip: must be an IP address, got 'lb'"),
    ],
)
def test_service_errors_are_one_line_naming_the_field(path: str, value: Any,
                                                      message: str) -> None:
    d = _set(service_dict(), path, value)

    with pytest.raises(ObjectError) as caught:
        service_from_dict(d, "f.yaml:3")

    assert str(caught.value) == message
    assert "\n" not in str(caught.value)
    assert format_path(caught.value.path) == caught.value.field_path


# -- EndpointSlice ------------------------------------------------------------


def test_slice_fields_are_read() -> None:
    d = slice_dict()
    d["endpoints"].append({"addresses": ["10.244.2.4"], "nodeName": "node-b",
                           "conditions": {"ready": False, "serving": True, "terminating": True}})
    d["ports"].append({"name": None, "port": 9090})

    endpoint_slice = slice_from_dict(d, "here")

    assert endpoint_slice.service_name == "web" and endpoint_slice.address_type == "IPv4"
    assert endpoint_slice.ports == (
        EndpointPort("http", 8080, "TCP"), EndpointPort("", 9090, "TCP")
    )
    assert endpoint_slice.endpoints == (
        SliceEndpoint(("10.244.1.7",), ready=True, serving=True, terminating=False),
        SliceEndpoint(("10.244.2.4",), ready=False, serving=True, terminating=True,
                      node_name="node-b"),
    )


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": False}, (False, False, False)),  # serving nil -> same as ready
        ({"ready": True, "serving": None}, (True, True, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
    ],
)
def test_slice_conditions_use_kubernetes_defaults(
    conditions: dict[str, Any] | None, expected: tuple[bool, bool, bool]
) -> None:
    d = slice_dict()
    d["endpoints"][0]["conditions"] = conditions

    endpoint = slice_from_dict(d, "here").endpoints[0]

    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == expected


def test_slice_with_null_endpoints_and_ports_is_empty() -> None:
    d = slice_dict()
    d["endpoints"] = None
    d["ports"] = None

    endpoint_slice = slice_from_dict(d, "here")

    assert endpoint_slice.endpoints == () and endpoint_slice.ports == ()


def test_ipv6_slice_and_fqdn_slice() -> None:
    v6 = slice_dict()
    v6["addressType"] = "IPv6"
    v6["endpoints"][0]["addresses"] = ["fd00:10:244:1:0:0:0:7"]
    fqdn = slice_dict()
    fqdn["addressType"] = "FQDN"
    fqdn["endpoints"][0]["addresses"] = ["db.example.com"]

    assert slice_from_dict(v6, "here").endpoints[0].addresses == ("fd00:10:244:1::7",)
    assert slice_from_dict(fqdn, "here").endpoints[0].addresses == ("db.example.com",)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("addressType", _DELETE, "s.json:9: addressType: must be IPv4, IPv6 or FQDN, got null"),
        ("addressType", "ipv4", "s.json:9: addressType: must be IPv4, IPv6 or FQDN, got 'ipv4'"),
        ("metadata/labels", {},
         's.json:9: metadata.labels["kubernetes.io/service-name"]: is required'),
        ("ports/0/port", "8080", "s.json:9: ports[0].port: must be an integer 1-65535, got '8080'"),
        ("ports/0/name", 3, "s.json:9: ports[0].name: must be a string, got 3"),
        ("ports/0/protocol", "HTTP",
         "s.json:9: ports[0].protocol: must be TCP, UDP or SCTP, got 'HTTP'"),
        ("endpoints/0/addresses", [],
         "s.json:9: endpoints[0].addresses: needs at least one address"),
        ("endpoints/0/addresses", ["fd00::1"],
         "s.json:9: endpoints[0].addresses[0]: must be an IPv4 address, got 'fd00::1'"),
        ("endpoints/0/addresses", "10.0.0.1",
         "s.json:9: endpoints[0].addresses: must be a list, got '10.0.0.1'"),
        ("endpoints/0/conditions", {"ready": "yes"},
         "s.json:9: endpoints[0].conditions.ready: must be true or false, got 'yes'"),
        ("endpoints/0/conditions", {"terminating": 0},
         "s.json:9: endpoints[0].conditions.terminating: must be true or false, got 0"),
        ("endpoints/0/nodeName", ["a"], "s.json:9: endpoints[0].nodeName: must be a string, "
         "got a list"),
        ("endpoints", {}, "s.json:9: endpoints: must be a list, got a mapping"),
    ],
)
def test_slice_errors_are_one_line_naming_the_field(path: str, value: Any, message: str) -> None:
    d = _set(slice_dict(), path, value)

    with pytest.raises(ObjectError) as caught:
        slice_from_dict(d, "s.json:9")

    assert str(caught.value) == message


def test_from_dict_does_not_modify_its_input() -> None:
    d = service_dict()
    s = slice_dict()
    before = (copy.deepcopy(d), copy.deepcopy(s))

    service_from_dict(d, "here")
    slice_from_dict(s, "here")

    assert (d, s) == before


# -- the short form -----------------------------------------------------------


def test_short_form_from_design_doc() -> None:
    services, slices = short_form_from_dict({"services": [{
        "name": "web",
        "clusterIP": "198.18.0.10",
        "sessionAffinity": "ClientIP",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        "endpoints": ["127.0.0.1", "127.0.0.2"],
    }]}, "here")

    assert services == [Service(
        namespace="default", name="web",
        ports=(ServicePortSpec("http", 80, "TCP", 8080),),
        cluster_ips=("198.18.0.10",), session_affinity="ClientIP",
    )]
    assert [(s.name, s.service_name, s.address_type, s.ports) for s in slices] == [
        ("web-ipv4", "web", "IPv4", (EndpointPort("http", 8080, "TCP"),)),
    ]
    assert [e.addresses for e in slices[0].endpoints] == [("127.0.0.1",), ("127.0.0.2",)]


def test_short_form_slices_per_family_and_explicit_port() -> None:
    services, slices = short_form_from_dict({"services": [{
        "name": "dns", "namespace": "kube-system",
        "ports": [{"port": 53, "protocol": "UDP"}],
        "endpoints": ["127.0.0.1", "127.0.0.2:53", "[::1]:5353", "::1", "127.0.0.3:5353"],
    }]}, "here")

    assert services[0].ports == (ServicePortSpec("", 53, "UDP"),)
    view = {s.name: (s.address_type, s.ports[0].port, [e.addresses[0] for e in s.endpoints])
            for s in slices}
    assert view == {
        "dns-ipv4": ("IPv4", 53, ["127.0.0.1", "127.0.0.2"]),
        "dns-ipv4-5353": ("IPv4", 5353, ["127.0.0.3"]),
        "dns-ipv6": ("IPv6", 53, ["::1"]),
        "dns-ipv6-5353": ("IPv6", 5353, ["::1"]),
    }
    assert all(s.namespace == "kube-system" and s.service_name == "dns" for s in slices)


def test_short_form_through_the_planner() -> None:
    services, slices = short_form_from_dict({"services": [{
        "name": "web",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                  {"name": "admin", "port": 81}],
        "endpoints": ["127.0.0.1", "127.0.0.2"],
    }]}, "here")

    state = desired_state({s.key: s for s in services}, {s.key: s for s in slices})

    by_port = {name.port: [str(e) for e in p.endpoints] for name, p in state.ports.items()}
    assert by_port == {"http": ["127.0.0.1:8080", "127.0.0.2:8080"],
                       "admin": ["127.0.0.1:81", "127.0.0.2:81"]}


def test_short_form_node_ports_make_a_node_port_service() -> None:
    services, _ = short_form_from_dict({"services": [{
        "name": "web", "externalIPs": ["198.18.3.3"], "sessionAffinityTimeout": 60,
        "ports": [{"port": 80, "nodePort": 30080}],
    }]}, "here")

    assert services[0].type == "NodePort"
    assert services[0].ports[0].node_port == 30080
    assert services[0].external_ips == ("198.18.3.3",)
    assert services[0].affinity_timeout == 60


def test_short_form_empty_services_means_none() -> None:
    assert short_form_from_dict({"services": []}, "here") == ([], [])


def test_short_form_service_without_endpoints_has_no_slices() -> None:
    services, slices = short_form_from_dict(
        {"services": [{"name": "lonely", "ports": [{"port": 80}]}]}, "here")

    assert len(services) == 1 and slices == []


def _short(**service: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "web", "ports": [{"port": 80}]}
    entry.update(service)
    return {"services": [entry]}


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"services": None}, "services: is required (write 'services: []' for none)"),
        ({"services": {"web": {}}}, "services: must be a list, got a mapping"),
        ({"services": [], "extra": 1}, "extra: unknown field (known: services)"),
        ({"services": ["web"]}, "services[0]: must be a mapping, got 'web'"),
        (_short(name=None), "services[0].name: is required"),
        (_short(name="my web"),
         "services[0].name: must be a non-empty name without '/' or spaces, got 'my web'"),
        (_short(ports=[]), "services[0].ports: needs at least one port"),
        (_short(ports=None), "services[0].ports: needs at least one port"),
        (_short(ports=[{"port": "http"}]),
         "services[0].ports[0].port: must be an integer 1-65535, got 'http'"),
        (_short(ports=[{"port": 80, "targetPort": "http"}]),
         "services[0].ports[0].targetPort: must be an integer 1-65535, got 'http'"),
        (_short(ports=[{"port": 80, "prot": "UDP"}]),
         "services[0].ports[0].prot: unknown field (known: name, nodePort, port, protocol, "
         "targetPort)"),
        (_short(ports=[{"port": 80}, {"port": 81}]),
         "services[0].ports[0].name: is required when there is more than one port"),
        (_short(ports=[{"port": 80, "nodePort": 30080}], type="ClusterIP"),
         "services[0].type: ClusterIP services have no nodePort; use NodePort"),
        (_short(type="ExternalName"),
         "services[0].type: must be ClusterIP, NodePort or LoadBalancer, got 'ExternalName'"),
        (_short(clusterIP="198.18.0.999"),
         "services[0].clusterIP: must be an IP address, got '198.18.0.999'"),
        (_short(sessionAffinityTimeout=90000),
         "services[0].sessionAffinityTimeout: must be an integer 1-86400, got 90000"),
        (_short(sessionAffinity="clientip"),
         "services[0].sessionAffinity: must be None or ClientIP, got 'clientip'"),
        (_short(endpoint=["127.0.0.1"]), "services[0].endpoint: unknown field (known: "
         "clusterIP, clusterIPs, endpoints, externalIPs, externalTrafficPolicy, "
         "internalTrafficPolicy, labels, name, namespace, ports, proxyProtocol, "
         "sessionAffinity, sessionAffinityTimeout, type)"),
        (_short(endpoints="127.0.0.1"),
         "services[0].endpoints: must be a list, got '127.0.0.1'"),
        (_short(endpoints=["localhost"]),
         "services[0].endpoints[0]: must be an endpoint like 10.0.0.1, 10.0.0.1:8080 or "
         "'[fd00::1]:8080', got 'localhost'"),
        (_short(endpoints=["127.0.0.1:0"]),
         "services[0].endpoints[0]: must be an endpoint like 10.0.0.1, 10.0.0.1:8080 or "
         "'[fd00::1]:8080', got '127.0.0.1:0'"),
        (_short(endpoints=["[127.0.0.1]:80"]),
         "services[0].endpoints[0]: must be an endpoint like 10.0.0.1, 10.0.0.1:8080 or "
         "'[fd00::1]:8080', got '[127.0.0.1]:80'"),
        (_short(endpoints=[["::1"]]),
         "services[0].endpoints[0]: must be a string like 10.0.0.1, 10.0.0.1:8080 or "
         "'[fd00::1]:8080', got a list (quote IPv6 endpoints)"),
        (_short(endpoints=["127.0.0.1", "127.0.0.1"]),
         "services[0].endpoints[1]: duplicate of endpoints[0]"),
        (_short(endpoints=["127.0.0.1", "127.0.0.1:80"]),
         "services[0].endpoints[1]: duplicate of endpoints[0]"),
        (_short(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81}],
                endpoints=["127.0.0.1:8080"]),
         "services[0].endpoints[0]: ip:port endpoints need a single-port service; this one "
         "has 2 ports (write the IP alone and set targetPort)"),
        ({"services": [{"name": "web", "ports": [{"port": 80}]},
                       {"name": "web", "ports": [{"port": 81}]}]},
         "services[1].name: duplicate service default/web (also services[0])"),
    ],
)
def test_short_form_errors_are_one_line_naming_the_field(d: dict[str, Any], message: str) -> None:
    with pytest.raises(ObjectError) as caught:
        short_form_from_dict(d, "svc.yaml:1")

    assert str(caught.value) == f"svc.yaml:1: {message}"


def test_same_name_in_two_namespaces_is_fine() -> None:
    services, _ = short_form_from_dict({"services": [
        {"name": "web", "ports": [{"port": 80}]},
        {"name": "web", "namespace": "other", "ports": [{"port": 80}]},
    ]}, "here")

    assert [str(s.key) for s in services] == ["default/web", "other/web"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", None)),
        ("10.0.0.1:8080", ("10.0.0.1", 8080)),
        ("fd00::1", ("fd00::1", None)),
        ("[fd00::1]", ("fd00::1", None)),
        ("[fd00:0::1]:53", ("fd00::1", 53)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "10.0.0.1:", "10.0.0.1:x", "[fd00::1", "[::1]x",
                                  "10.0.0.1:65536", "[::1]:-1", "host:80"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


# -- round trip ---------------------------------------------------------------

_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(1, 65535)
_protocol = st.sampled_from(["TCP", "UDP"])


def _format_endpoint(ip: str, port: int | None) -> str:
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@st.composite
def short_services(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 4))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
                          min_size=count, max_size=count, unique=True))
    ports = []
    for name in names if count > 1 else [None]:
        port: dict[str, Any] = {"port": draw(_port), "protocol": draw(_protocol)}
        if name is not None:
            port["name"] = name
        if draw(st.booleans()):
            port["targetPort"] = draw(_port)
        ports.append(port)
    ips = draw(st.lists(st.one_of(_ipv4, _ipv6), max_size=6, unique=True))
    endpoints = [
        _format_endpoint(ip, draw(st.none() | _port) if count == 1 else None) for ip in ips
    ]
    return {"name": "svc", "ports": ports, "endpoints": endpoints}


@settings(max_examples=200, deadline=None)
@given(short_services())
def test_short_form_round_trips_ports_and_endpoints(entry: dict[str, Any]) -> None:
    services, slices = short_form_from_dict({"services": [entry]}, "here")

    # ports come back as written
    (service,) = services
    written_ports = [
        (p.get("name", ""), p["port"], p["protocol"], p.get("targetPort", 0))
        for p in entry["ports"]
    ]
    assert [(p.name, p.port, p.protocol, p.target_port) for p in service.ports] == written_ports

    # every endpoint is in exactly one slice of its family, with the port it names
    single = service.ports[0]
    default_port = int(single.target_port or single.port)
    seen = []
    for endpoint_slice in slices:
        assert endpoint_slice.service == service.key
        for endpoint in endpoint_slice.endpoints:
            (ip,) = endpoint.addresses
            family = ipaddress.ip_address(ip).version
            assert endpoint_slice.address_type == f"IPv{family}"
            if len(service.ports) == 1:
                port = endpoint_slice.ports[0].port
                seen.append(_format_endpoint(ip, None if port == default_port else port))
            else:
                seen.append(ip)
                assert [p.port for p in endpoint_slice.ports] == [
                    p.target_port or p.port for p in service.ports
                ]
    written = [_normalise(e, default_port if len(service.ports) == 1 else None)
               for e in entry["endpoints"]]
    assert sorted(seen) == sorted(written)
    assert len({s.key for s in slices}) == len(slices)


def _normalise(endpoint: str, default_port: int | None) -> str:
    ip, port = parse_endpoint(endpoint)
    return _format_endpoint(ip, None if port == default_port else port)


@pytest.mark.parametrize(("target_ref", "pod"), [
    ({"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "u"}, "shop/web-1"),
    ({"kind": "Pod", "name": "web-1"}, "shop/web-1"),  # the slice's namespace
    ({"kind": "Node", "name": "n1"}, ""),
    (None, ""),
])
def test_an_endpoint_knows_its_pod_from_its_target_ref(
        target_ref: dict[str, str] | None, pod: str) -> None:
    d = slice_dict()
    if target_ref is not None:
        d["endpoints"][0]["targetRef"] = target_ref
    (endpoint,) = slice_from_dict(d, "test").endpoints
    assert endpoint.pod == pod


def test_a_bad_target_ref_is_one_line_naming_it() -> None:
    d = slice_dict()
    d["endpoints"][0]["targetRef"] = {"kind": "Pod", "name": 7}
    with pytest.raises(ObjectError, match=r"endpoints\[0\]\.targetRef\.name: must be a string"):
        slice_from_dict(d, "test")


def test_the_proxy_protocol_annotation_is_read_as_written() -> None:
    d = service_dict()
    d["metadata"]["annotations"] = {"uproxy/proxy-protocol": "v2", "other": "x"}
    assert service_from_dict(d, "here").proxy_protocol == "v2"
    assert service_from_dict(service_dict(), "here").proxy_protocol == ""


# -- topology hints, Nodes, health check node ports --------------------------------------


def test_slice_hints_are_read_per_endpoint() -> None:
    d = slice_dict()
    d["endpoints"][0]["hints"] = {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}],
                                  "forNodes": [{"name": "node-1"}]}
    d["endpoints"].append({"addresses": ["10.244.1.8"], "hints": None})
    first, second = slice_from_dict(d, "test").endpoints
    assert (first.zone_hints, first.node_hints) == (("zone-a", "zone-b"), ("node-1",))
    assert (second.zone_hints, second.node_hints) == ((), ())


def test_a_bad_hint_is_one_line_naming_it() -> None:
    d = slice_dict()
    d["endpoints"][0]["hints"] = {"forZones": [{"name": 3}]}
    with pytest.raises(ObjectError, match=r"endpoints\[0\]\.hints\.forZones\[0\]\.name: "
                                          "must be a string"):
        slice_from_dict(d, "test")


def node_dict(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1",
                         "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": spec}


def test_a_node_has_a_zone_and_is_terminating_when_deleted_or_drained() -> None:
    assert node_from_dict(node_dict(), "n") == Node("node-1", "zone-a", False)
    deleted = node_dict()
    deleted["metadata"]["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    assert node_from_dict(deleted, "n").terminating
    drained = node_dict(taints=[{"key": "ToBeDeletedByClusterAutoscaler",
                                 "value": "1733270400", "effect": "NoSchedule"}])
    assert node_from_dict(drained, "n").terminating
    other = node_dict(taints=[{"key": "node.kubernetes.io/unschedulable",
                               "effect": "NoSchedule"}])
    assert not node_from_dict(other, "n").terminating
    bare = {"metadata": {"name": "node-2"}}
    assert node_from_dict(bare, "n") == Node("node-2")


def test_a_health_check_node_port_is_read() -> None:
    d = service_dict()
    d["spec"].update(type="LoadBalancer", externalTrafficPolicy="Local",
                     healthCheckNodePort=32000)
    assert service_from_dict(d, "here").health_check_node_port == 32000
    assert service_from_dict(service_dict(), "here").health_check_node_port is None
    d["spec"]["healthCheckNodePort"] = 70000
    with pytest.raises(ObjectError, match=r"spec\.healthCheckNodePort"):
        service_from_dict(d, "here")
