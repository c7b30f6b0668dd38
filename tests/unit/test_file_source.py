"""Loading services files: kubectl output, manifests, the short form, folders, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import uproxy
import uproxy.sources.file as file_module
from uproxy.model import EndpointPort, ObjectName, SliceEndpoint
from uproxy.planner import desired_state
from uproxy.sources.file import SourceFileError, load_services_file

DATA = Path(__file__).parent.parent / "data"
KUBECTL_YAML = DATA / "kubectl-get-svc-endpointslices.yaml"
KUBECTL_JSON = DATA / "kubectl-get-svc-endpointslices.json"
EXAMPLE = Path(uproxy.__file__).parent / "data" / "example-services.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(SourceFileError) as caught:
        load_services_file(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- kubectl output -------------------------------------------------------------


def test_kubectl_list_loads_every_service_type() -> None:
    services, slices = load_services_file(KUBECTL_YAML)

    assert sorted(str(k) for k in services) == [
        "default/kubernetes", "ingress-nginx/ingress-nginx-controller", "kube-system/dns-np",
        "shop/payments-api", "shop/web", "shop/web-headless",
    ]
    web = services[ObjectName("shop", "web")]
    assert web.cluster_ips == ("10.96.120.15", "fd00:10:96::7a1c")
    assert [(p.name, p.target_port) for p in web.ports] == [("http", "http"), ("metrics", 9090)]
    assert web.session_affinity == "ClientIP" and web.affinity_timeout == 600
    assert services[ObjectName("shop", "web-headless")].cluster_ips == ("None",)
    assert services[ObjectName("shop", "payments-api")].type == "ExternalName"
    node_port = services[ObjectName("kube-system", "dns-np")]
    assert [(p.protocol, p.node_port) for p in node_port.ports] == [("UDP", 30053), ("TCP", 30054)]
    assert node_port.external_traffic_policy == "Local"
    balancer = services[ObjectName("ingress-nginx", "ingress-nginx-controller")]
    assert balancer.type == "LoadBalancer"
    assert balancer.load_balancer_ips == ("172.18.255.200",)
    assert balancer.external_ips == ("198.18.7.7",)

    assert len(slices) == 6
    web_v4 = slices[ObjectName("shop", "web-7xq2m")]
    assert web_v4.ports == (EndpointPort("http", 8080), EndpointPort("metrics", 9090))
    assert web_v4.endpoints[1] == SliceEndpoint(
        ("10.244.2.4",), ready=False, serving=True, terminating=True, node_name="kind-worker2",
        pod="shop/web-6d4b75cb6d-q9zvw",  # its targetRef (kind Pod)
    )
    assert slices[ObjectName("shop", "web-v6-k2j4p")].address_type == "IPv6"
    assert slices[ObjectName("kube-system", "dns-np-pq8rt")].endpoints == ()
    defaults = slices[ObjectName("ingress-nginx", "ingress-nginx-controller-5bdfx")].endpoints[1]
    assert (defaults.ready, defaults.serving, defaults.terminating) == (True, True, False)
    assert slices[ObjectName("default", "unnamed-port-abcde")].ports == (EndpointPort("", 5000),)


def test_kubectl_json_loads_the_same_as_yaml() -> None:
    assert load_services_file(KUBECTL_JSON) == load_services_file(KUBECTL_YAML)


def test_kubectl_list_plans_named_target_ports_and_skips() -> None:
    services, slices = load_services_file(KUBECTL_YAML)

    state = desired_state(services, slices)

    http = {str(n): [str(e) for e in p.endpoints] for n, p in state.ports.items()
            if n.name == "web"}
    assert http == {"shop/web:http": ["10.244.1.7:8080", "[fd00:10:244:1::7]:8080"],
                    "shop/web:metrics": ["10.244.1.7:9090", "[fd00:10:244:1::7]:9090"]}
    assert set(state.skipped) == {ObjectName("shop", "web-headless"),
                                  ObjectName("shop", "payments-api")}


def test_multi_document_manifests_with_empty_documents() -> None:
    services, slices = load_services_file(DATA / "manifests.yaml")

    assert list(services) == [ObjectName("default", "redis")]
    redis = slices[ObjectName("default", "redis-1")]
    assert redis.service == ObjectName("default", "redis")
    assert [e.ready for e in redis.endpoints] == [True, False]


def test_api_typed_lists_whose_items_have_no_kind(tmp_path: Path) -> None:
    listing = {
        "kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "99"},
        "items": [{"metadata": {"name": "a", "namespace": "x"},
                   "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}],
    }
    slice_listing = {
        "kind": "EndpointSliceList", "items": [{
            "metadata": {"name": "a-1", "namespace": "x",
                         "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4", "ports": [{"port": 80}],
            "endpoints": [{"addresses": ["10.1.0.1"]}],
        }],
    }
    path = write(tmp_path, "api.yaml", json.dumps(listing) + "\n---\n" + json.dumps(slice_listing))

    services, slices = load_services_file(path)

    assert list(services) == [ObjectName("x", "a")]
    assert list(slices) == [ObjectName("x", "a-1")]


def test_short_form_in_json(tmp_path: Path) -> None:
    path = write(tmp_path, "s.json", json.dumps(
        {"services": [{"name": "web", "ports": [{"port": 80}], "endpoints": ["127.0.0.1"]}]}))

    services, slices = load_services_file(path)

    assert list(services) == [ObjectName("default", "web")]
    assert list(slices) == [ObjectName("default", "web-ipv4")]


def test_empty_short_form_means_no_services(tmp_path: Path) -> None:
    assert load_services_file(write(tmp_path, "s.yaml", "services: []\n")) == ({}, {})


def test_empty_kubectl_list_means_no_services(tmp_path: Path) -> None:
    path = write(tmp_path, "s.yaml", "apiVersion: v1\nitems: []\nkind: List\n")

    assert load_services_file(path) == ({}, {})


def test_bundled_example_file_loads() -> None:
    services, slices = load_services_file(EXAMPLE)

    assert sorted(s.name for s in services.values()) == ["dns", "echo", "web"]
    assert {p.protocol for s in services.values() for p in s.ports} == {"TCP", "UDP"}
    state = desired_state(services, slices)
    counts = {n.name: len(p.endpoints) for n, p in state.ports.items()}
    assert counts == {"web": 2, "echo": 1, "dns": 1}
    assert all(str(e).startswith("127.0.0.1:") for p in state.ports.values()
               for e in p.endpoints)


# -- folders ------------------------------------------------------------------


def test_folder_loads_every_services_file_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", "services: [{name: b, ports: [{port: 81}]}]\n")
    write(tmp_path, "a.yaml", "services: [{name: a, ports: [{port: 80}]}]\n")
    write(tmp_path, "c.json", '{"services": [{"name": "c", "ports": [{"port": 82}]}]}')
    write(tmp_path, "notes.txt", "not a services file")
    write(tmp_path, ".d.yaml", "half-written editor backup: [")

    services, _ = load_services_file(tmp_path)

    assert [k.name for k in services] == ["a", "b", "c"]


def test_folder_names_must_not_collide(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "services:\n  - name: web\n    ports: [{port: 80}]\n")
    write(tmp_path, "b.yaml", "# again\nservices:\n  - name: other\n    ports: [{port: 80}]\n"
                              "  - name: web\n    ports: [{port: 81}]\n")

    message = load_error(tmp_path)

    assert message == (f"{tmp_path}/b.yaml:5: services[1].name: duplicate Service default/web "
                       f"(first at {tmp_path}/a.yaml:2)")


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"{tmp_path}: no *.yaml, *.yml or *.json files in this folder"


# -- errors name file, line and field ---------------------------------------------


def test_field_error_in_a_kubectl_list_points_at_the_line(tmp_path: Path) -> None:
    text = KUBECTL_YAML.read_text().replace("      port: 9090\n", "      port: metrics\n", 1)
    path = write(tmp_path, "svc.yaml", text)
    line = text.splitlines().index("      port: metrics") + 1

    assert load_error(path) == (
        f"{path}:{line}: items[1].spec.ports[1].port: must be an integer 1-65535, got 'metrics'"
    )


def test_field_error_in_json_points_at_the_line(tmp_path: Path) -> None:
    text = KUBECTL_JSON.read_text().replace('"172.18.255.200"', '"lb.local"')
    path = write(tmp_path, "svc.json", text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if '"lb.local"' in t)

    assert load_error(path) == (
        f"{path}:{line}: items[5].status.loadBalancer.ingress[0].ip: "
        "must be an IP address, got 'lb.local'"
    )


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n"
                                     "  namespace: shop\nspec: {}\n")

    assert load_error(path) == f"{path}:4: metadata.name: is required"


def test_error_in_second_document_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", (
        "kind: Service\nmetadata: {name: a}\n---\n"
        "kind: EndpointSlice\nmetadata:\n  name: a-1\n  labels: {kubernetes.io/service-name: a}\n"
        "addressType: IPv4\nendpoints:\n  - addresses: [10.0.0.1]\n"
        "    conditions: {ready: maybe}\n"
    ))

    assert load_error(path) == (
        f"{path}:11: endpoints[0].conditions.ready: must be true or false, got 'maybe'"
    )


def test_short_form_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "s.yaml", (
        "services:\n"
        "  - name: web\n"
        "    ports:\n"
        "      - {name: a, port: 80}\n"
        "      - {name: b, port: 81}\n"
        "    endpoints:\n"
        "      - 127.0.0.1\n"
        "      - 127.0.0.2:8080\n"
    ))

    assert load_error(path) == (
        f"{path}:8: services[0].endpoints[1]: ip:port endpoints need a single-port service; "
        "this one has 2 ports (write the IP alone and set targetPort)"
    )


def test_unquoted_ipv6_endpoint_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "s.yaml", (
        "services:\n  - name: web\n    ports: [{port: 80}]\n    endpoints:\n      - [::1]:80\n"
    ))

    message = load_error(path)

    assert message.startswith(f"{path}:5: invalid YAML: ")
    assert message.endswith(" (quote IPv6 endpoints: '[fd00::1]:8080')")


def test_duplicate_object_in_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "l.yaml", (
        "kind: List\nitems:\n"
        "- kind: Service\n  metadata: {name: a}\n"
        "- kind: Service\n  metadata:\n    name: a\n"
    ))

    assert load_error(path) == (
        f"{path}:7: items[1].metadata.name: duplicate Service default/a (first at {path}:4)"
    )


def test_short_form_slice_colliding_with_a_written_slice(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", (
        "services:\n  - name: web\n    ports: [{port: 80}]\n    endpoints: [127.0.0.1]\n---\n"
        "kind: EndpointSlice\nmetadata:\n  name: web-ipv4\n"
        "  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n"
    ))

    assert load_error(path) == (
        f"{path}:8: metadata.name: duplicate EndpointSlice default/web-ipv4 (first at {path}:4)"
    )


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("e.yaml", "", "{p}: empty file (write 'services: []' for no services)"),
        ("e.yaml", "  \n\n", "{p}: empty file (write 'services: []' for no services)"),
        ("e.json", "", "{p}: empty file (write 'services: []' for no services)"),
        ("c.yaml", "# nothing yet\n---\n",
         "{p}: no objects in the file (write 'services: []' for no services)"),
        ("b.json", '{"services": [\n  {"name": "web",}\n]}',
         "{p}:2: invalid JSON: Expecting property name enclosed in double quotes"),
        ("l.yaml", "- kind: Service\n", "{p}:1: expected a Kubernetes object or a 'services:' "
         "mapping, got a list"),
        ("s.yaml", "just text\n", "{p}:1: expected a Kubernetes object or a 'services:' "
         "mapping, got 'just text'"),
        ("k.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
         "{p}:2: kind: must be Service, EndpointSlice, Node or List, got 'Pod'"),
        ("k.yaml", "apiVersion: v1\nmetadata: {name: p}\n",
         "{p}:1: kind: is required (Service, EndpointSlice, Node or List), or use the short form "
         "'services:'"),
        ("i.yaml", "kind: List\nitems: {a: 1}\n", "{p}:2: items: must be a list, got a mapping"),
        ("i.yaml", "kind: List\nitems:\n- 3\n", "{p}:3: items[0]: must be a mapping, got 3"),
        ("s.yaml", "services:\n", "{p}:1: services: is required (write 'services: []' for none)"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, name: str, text: str,
                                       expected: str) -> None:
    path = write(tmp_path, name, text)

    assert load_error(path) == expected.format(p=path)


@pytest.mark.parametrize(
    ("text", "prefix", "problem"),
    [
        ("services:\n  - name: web\n    ports: [{port: 80}\n", "{p}:4: invalid YAML: ", "']'"),
        ("services:\n  - name: web\n   bad: indentation\n", "{p}:3: invalid YAML: ", "expected"),
    ],
)
def test_unparsable_yaml_names_the_line(tmp_path: Path, text: str, prefix: str,
                                        problem: str) -> None:
    path = write(tmp_path, "b.yaml", text)

    message = load_error(path)

    # libyaml and pure-Python PyYAML word the problem differently
    assert message.startswith(prefix.format(p=path))
    assert problem in message


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    assert load_error(path) == f"{path}: cannot read: No such file or directory"


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"services: []\n\xff\xfe")

    assert load_error(path) == f"{path}: not UTF-8 text (byte 13)"


@pytest.mark.parametrize(
    "text",
    [
        KUBECTL_YAML.read_text(),
        (DATA / "manifests.yaml").read_text(),
        "a: &x {b: 1, c: [yes, no, ~, 0x1f, 1_000, 3.5, 2024-01-01, '07', 010, 0, -3, 1:20]}\n"
        "d: *x\ne:\n  <<: *x\n  f: 2\n",
    ],
)
def test_fast_construction_builds_what_safe_load_builds(text: str) -> None:
    loader = file_module._Loader(text)
    documents = []
    while loader.check_node():
        node = loader.get_node()
        assert node is not None
        documents.append(file_module._construct(loader, node, {}))

    assert documents == list(yaml.safe_load_all(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("? [1, 2]\n: g\n", "{p}:1: invalid YAML: found unhashable key"),
        ("&a [*a]\n", "{p}:1: invalid YAML: an alias refers to itself"),
        ("a: &a {b: [1, *a]}\n", "{p}:1: invalid YAML: an alias refers to itself"),
        ("a: !foo 1\n", "{p}:1: invalid YAML: could not determine a constructor for the tag "
         "'!foo'"),
    ],
)
def test_yaml_that_cannot_be_built_is_an_error(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "odd.yaml", text)

    assert load_error(path) == expected.format(p=path)


def test_json_in_a_yaml_named_file_loads_like_yaml(tmp_path: Path) -> None:
    """The JSON fast path must give what the YAML path gives, errors included."""
    document = {"services": [{"name": "web", "ports": [{"port": 80}],
                              "endpoints": ["127.0.0.1:8080"]}]}
    as_json = tmp_path / "a.yaml"
    as_json.write_text(json.dumps(document, indent=1))
    as_yaml = tmp_path / "b.yaml"
    as_yaml.write_text(yaml.safe_dump(document))
    assert load_services_file(as_json) == load_services_file(as_yaml)

    flow = tmp_path / "flow.yaml"  # YAML flow style that is not JSON still loads
    flow.write_text("{services: [{name: web, ports: [{port: 80}], endpoints: [127.0.0.1]}]}\n")
    services, _ = load_services_file(flow)
    assert [str(key) for key in services] == ["default/web"]

    document["services"][0]["ports"][0]["port"] = "http"
    as_json.write_text(json.dumps(document, indent=1))
    with pytest.raises(SourceFileError, match=r"a\.yaml:\d+: .*port"):
        load_services_file(as_json)


# A "billion laughs": 9 levels of 9 aliases, 342 bytes, ~490 million nodes expanded.
ALIAS_BOMB = "a: &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
    f"{name}: &{name} [{','.join([f'*{previous}'] * 9)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True))


def test_an_alias_bomb_is_refused_at_once_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bomb.yaml", ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400

    started = time.process_time()
    message = load_error(path)

    assert time.process_time() - started < 5  # was: minutes and gigabytes
    assert message.startswith(f"{path}:1: YAML aliases expand this document to 490329064 "
                              "nodes from 28 written")
    assert "\n" not in message


def test_anchors_that_share_a_little_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "shared.yaml", """\
services:
  - name: web
    ports: &ports [{name: http, port: 80, targetPort: 8080}]
    endpoints: &pods [127.0.0.1, 127.0.0.2]
  - name: web2
    ports: *ports
    endpoints: *pods
""")
    services, _ = load_services_file(path)
    assert [str(key) for key in services] == ["default/web", "default/web2"]


def test_a_file_over_the_size_limit_is_refused_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "MAX_FILE_BYTES", 10)
    path = write(tmp_path, "big.yaml", "services: []\n")
    assert load_error(path) == f"{path}: 13 bytes, more than the 10 a services file may have"


# -- a reload converts only what changed ------------------------------------------------


def test_a_reload_converts_only_the_entries_that_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uproxy.sources import objects
    from uproxy.sources.file import load_objects
    from uproxy.sources.objects import Memo

    path = tmp_path / "services.json"
    entries = [{"name": f"s{i}", "ports": [{"port": 80}], "endpoints": ["127.0.0.1"]}
               for i in range(50)]
    path.write_text(json.dumps({"services": entries}))
    converted: list[str] = []
    real = objects._short_service

    def counting(read: Any, entry: Any, at: Any) -> Any:
        converted.append(entry["name"])
        return real(read, entry, at)

    monkeypatch.setattr(objects, "_short_service", counting)
    memo = Memo()
    first = load_objects(path, memo=memo)
    assert len(converted) == 50
    converted.clear()

    entries[7]["endpoints"] = ["127.0.0.2"]
    path.write_text(json.dumps({"services": entries}))
    second = load_objects(path, memo=memo)
    assert converted == ["s7"]
    key = ObjectName("default", "s3")
    assert second.services[key] is first.services[key]  # the very same object
    assert second.slices != first.slices  # s7's endpoint changed

    converted.clear()
    path.write_text("services: [")  # a bad file: the last good conversions stay
    with pytest.raises(SourceFileError):
        load_objects(path, memo=memo)
    path.write_text(json.dumps({"services": entries}))
    load_objects(path, memo=memo)
    assert converted == []


def test_kubectl_objects_are_compared_without_managed_fields(tmp_path: Path) -> None:
    from uproxy.sources.file import load_objects
    from uproxy.sources.objects import Memo

    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "shop",
                            "managedFields": [{"manager": "kubectl", "time": "1"}]},
               "spec": {"clusterIP": "198.18.0.10", "ports": [{"port": 80}]}}
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({"kind": "List", "items": [service]}))
    memo = Memo()
    first = load_objects(path, memo=memo).services[ObjectName("shop", "web")]
    service["metadata"]["managedFields"] = [{"manager": "kubectl", "time": "2"}]
    path.write_text(json.dumps({"kind": "List", "items": [service]}))
    assert load_objects(path, memo=memo).services[ObjectName("shop", "web")] is first
    service["spec"]["ports"] = [{"port": 81}]
    path.write_text(json.dumps({"kind": "List", "items": [service]}))
    changed = load_objects(path, memo=memo).services[ObjectName("shop", "web")]
    assert changed is not first and changed.ports[0].port == 81
