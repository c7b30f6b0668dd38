"""deploy/: valid against a pinned Kubernetes, shaped as a node proxy must be,
and its ClusterRole grants exactly what uproxy calls on a real (test) API server."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.kubeapi import FakeKubeAPI, endpoint_slice, node, service
from uproxy import __version__
from uproxy.cli import parse_settings
from uproxy.sources.kube import KubeSource

DEPLOY = Path(__file__).parent.parent.parent / "deploy"
KUBERNETES_VERSION = "1.33.0"  # the schemas kubernetes-validate checks against
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid_for_the_pinned_kubernetes(path: Path) -> None:
    kubernetes_validate.validate(load(path), KUBERNETES_VERSION, strict=True)


def test_the_kustomization_holds_every_node_manifest_and_the_version() -> None:
    kustomization = load(DEPLOY / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    (image,) = kustomization["images"]
    assert image == {"name": "localhost/uproxy", "newTag": __version__}


def test_the_daemonset_is_a_least_privilege_node_proxy() -> None:
    pod = load(DEPLOY / "daemonset.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "uproxy"
    assert {"operator": "Exists"} in pod["tolerations"]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 10256}
    (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["xtables-lock"] == "/run/xtables.lock"
    # The arguments are uproxy's own: they parse, with the node name filled in.
    args = [re.sub(r"\$\(NODE_NAME\)", "node-1", arg) for arg in container["args"]]
    settings, cleanup = parse_settings(args)
    assert not cleanup
    assert settings.source.node_name == "node-1"
    assert settings.web.healthz_bind == ("0.0.0.0", 10256)
    assert settings.web.metrics_bind == ("127.0.0.1", 10249)
    assert settings.rules_backend == "iptables"


# --- RBAC: every call uproxy makes is allowed, and every grant is used ---------------

Call = tuple[str, str, str]  # (verb, apiGroup, resource[/subresource])
_RESOURCE_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/[^/]+)?/(?P<resource>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")


def call_of(method: str, path: str, query: dict[str, str]) -> Call | None:
    """A request as RBAC sees it; None for non-resource paths (/version, /api)."""
    found = _RESOURCE_PATH.match(path)
    if found is None or path.startswith("/_test"):
        return None
    group, resource = found["group"] or "", found["resource"]
    if found["sub"]:
        resource = f"{resource}/{found['sub']}"
    if method == "GET" and found["name"] is None:
        verb = "watch" if query.get("watch", "").lower() in ("1", "true") else "list"
    else:
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}[method]
    return verb, group, resource


def grants(path: Path) -> set[Call]:
    return {(verb, group, resource) for rule in load(path)["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI(bookmark_interval=0.2)
    await server.start()
    yield server
    await server.stop()


async def _calls_of_a_run(api: FakeKubeAPI, namespaces: tuple[str, ...]) -> set[Call]:
    """Run the Kubernetes source through paging, watching and a 410 relist."""
    import asyncio

    from tests.integration.apphelpers import running
    from tests.integration.test_file_reload import RecordingSink

    for i in range(3):
        api.create(service("default", f"s{i}", ports=[{"name": "p", "port": 80}]))
        api.create(endpoint_slice("default", f"s{i}-x", f"s{i}", addresses=["127.0.0.1"],
                                  ports=[{"name": "p", "port": 80}]))
    api.create(node("node-1", "zone-a"))
    source = KubeSource(master=api.url, namespaces=namespaces, watch_timeout=2,
                        backoff_initial=0.05, backoff_cap=0.2, node_name="node-1")
    sink = RecordingSink()
    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
        api.create(service("default", "late", ports=[{"name": "p", "port": 80}]))
        await sink.wait_until(lambda: any(e[0] == "service" and getattr(e[2], "name", "")
                                          == "late" for e in sink.events))
        relists = sum(source.relists.values())
        api.restart()  # a new resourceVersion epoch: every watch gets 410, then relists
        deadline = asyncio.get_running_loop().time() + 10
        while sum(source.relists.values()) <= relists:
            assert asyncio.get_running_loop().time() < deadline, "no relist after 410"
            await asyncio.sleep(0.05)
    return {call for method, path, query in api.requests
            if (call := call_of(method, path, query)) is not None}


@pytest.mark.parametrize("namespaces", [(), ("default",)], ids=["cluster", "namespaced"])
async def test_the_node_role_allows_every_call_and_grants_nothing_unused(
    api: FakeKubeAPI, namespaces: tuple[str, ...]
) -> None:
    calls = await _calls_of_a_run(api, namespaces)
    granted = grants(DEPLOY / "clusterrole.yaml")
    assert calls, "the source made no API call"
    assert calls <= granted, f"not granted: {sorted(calls - granted)}"
    assert granted <= calls, f"granted, never used: {sorted(granted - calls)}"


def test_the_laptop_role_trades_the_node_watch_for_port_forward() -> None:
    """A laptop is no node (it never asks for its Node) and reaches pods through
    the API server."""
    on_node, laptop = grants(DEPLOY / "clusterrole.yaml"), grants(DEPLOY / "laptop" /
                                                                 "clusterrole.yaml")
    assert laptop - on_node == {("get", "", "pods/portforward"),
                                ("create", "", "pods/portforward")}
    assert on_node - laptop == {("list", "", "nodes"), ("watch", "", "nodes")}
