"""deploy/: valid against a pinned Kubernetes, shaped as a node proxy must be,
and its ClusterRoles (node, laptop) grant exactly what uproxy calls on the test
API server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.integration.apphelpers import running
from tests.integration.test_file_reload import RecordingSink
from tests.integration.test_portforward import Cluster, ask, uproxy
from tests.kubeapi import ApiCall, FakeKubeAPI, endpoint_slice, node, service
from uproxy import __version__
from uproxy.app import make_source
from uproxy.cli import parse_settings
from uproxy.sources.kube import LIST_PAGE_SIZE, KubeSource

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
    settings, cleanup = parse_settings(daemonset_args())
    assert not cleanup
    assert settings.source.node_name == "node-1"
    assert settings.web.healthz_bind == ("0.0.0.0", 10256)
    assert settings.web.metrics_bind == ("127.0.0.1", 10249)
    assert settings.rules_backend == "iptables"


# --- RBAC: every call uproxy makes is allowed, and every grant is used ---------------
#
# The test API server records every resource request as RBAC sees it
# (tests/kubeapi.py ApiCall); a run of uproxy as deployed goes through what
# it ever calls: paged lists (and a list whose continue token expired), watches,
# a watch event, a relist after 410, its own Node; the laptop, a port-forward.

Grant = tuple[str, str, str]  # (verb, apiGroup, resource or resource/subresource)


def grants(path: Path) -> set[Grant]:
    return {(verb, group, resource) for rule in load(path)["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


def needed(call: ApiCall) -> set[Grant]:
    """What a role must grant for `call` to pass on every supported Kubernetes.
    A WebSocket upgrade is a GET, authorized as `get`; from 1.35 the API
    server checks `create` too for exec, attach and portforward
    (AuthorizePodWebsocketUpgradeCreatePermission, on by default)."""
    grant = {(call.verb, call.group, call.rule_resource)}
    if call.websocket and call.subresource in ("exec", "attach", "portforward"):
        grant.add(("create", call.group, call.rule_resource))
    return grant


def daemonset_args() -> list[str]:
    (container,) = load(DEPLOY / "daemonset.yaml")["spec"]["template"]["spec"]["containers"]
    return [arg.replace("$(NODE_NAME)", "node-1") for arg in container["args"]]


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI(bookmark_interval=0.2)
    await server.start()
    yield server
    await server.stop()


def scopes(namespaces: tuple[str, ...]) -> set[tuple[str, str]]:
    """(resource, namespace) of every loop: per namespace asked for, or across all
    (""); its own Node is cluster-scoped."""
    return {(resource, namespace) for resource in ("services", "endpointslices")
            for namespace in (namespaces or ("",))} | {("nodes", "")}


def listed_then_watched(calls: list[ApiCall], scope: tuple[str, str]) -> bool:
    verbs = [c.verb for c in calls if (c.resource, c.namespace) == scope]
    return "list" in verbs and "watch" in verbs[verbs.index("list"):]


async def _calls_of_a_node_run(api: FakeKubeAPI, namespaces: tuple[str, ...]) -> list[ApiCall]:
    """The source uproxy builds from the DaemonSet's arguments, through paging,
    an expired continue token, watching and a 410 relist."""
    for i in range(LIST_PAGE_SIZE + 1):  # two pages of each
        api.create(service("default", f"s{i}", ports=[{"name": "p", "port": 80}]))
        api.create(endpoint_slice("default", f"s{i}-x", f"s{i}", addresses=["127.0.0.1"],
                                  ports=[{"name": "p", "port": 80}]))
    api.create(node("node-1", "zone-a"))
    api.expire_next_continues(1, resource="services")  # then one list without a limit
    flags = [arg for namespace in namespaces for arg in ("--namespace", namespace)]
    settings, _ = parse_settings([*daemonset_args(), "--master", api.url, *flags])
    source = make_source(settings)
    assert isinstance(source, KubeSource) and source.node_name == "node-1"
    sink = RecordingSink()
    async with running(source, sink):
        await sink.wait_until(lambda: any(e[0] == "synced" for e in sink.events))
        api.create(service("default", "late", ports=[{"name": "p", "port": 80}]))
        await sink.wait_until(lambda: any(e[0] == "service" and getattr(e[2], "name", "")
                                          == "late" for e in sink.events))
        restarted = len(api.calls)
        api.restart()  # a new resourceVersion epoch: every watch gets 410, then relists
        deadline = asyncio.get_running_loop().time() + 10
        while not all(listed_then_watched(api.calls[restarted:], scope)
                      for scope in scopes(namespaces)):
            assert asyncio.get_running_loop().time() < deadline, "no relist after 410"
            await asyncio.sleep(0.05)
    # The run went where it was meant to: a continue that expired, and one that
    # served the second page (of the relist).
    continued = [c.status for c in api.list_calls("services") if c.continue_ is not None]
    assert 410 in continued and 200 in continued, continued
    return api.calls


@pytest.mark.parametrize("namespaces", [(), ("default",), ("default", "team-a")],
                         ids=["cluster", "namespaced", "two-namespaces"])
async def test_the_node_role_allows_every_call_and_grants_nothing_unused(
    api: FakeKubeAPI, namespaces: tuple[str, ...]
) -> None:
    calls = await _calls_of_a_node_run(api, namespaces)
    need = set().union(*map(needed, calls))
    granted = grants(DEPLOY / "clusterrole.yaml")
    assert need <= granted, f"not granted: {sorted(need - granted)}"
    assert granted <= need, f"granted, never used: {sorted(granted - need)}"
    # Per-namespace mode asks in those namespaces only (a namespaced Role
    # would do there); its Node is cluster-scoped.
    assert {(c.resource, c.namespace) for c in calls} == scopes(namespaces)


async def test_the_laptop_role_allows_a_port_forward_run_and_grants_nothing_unused() -> None:
    """A laptop is no node (it never asks for its Node) and reaches pods through
    the API server's port-forward."""
    api = FakeKubeAPI(bookmark_interval=1.0)
    await api.start()
    cluster = Cluster(api)
    try:
        await cluster.add_pod("web-1")
        cluster.publish("web", ["web-1"])
        async with uproxy(cluster) as up:
            answer = await ask(up.address("default/web", "p"), b"x", half_close=True)
        assert answer == b"web-1:xweb-1:bye"
    finally:
        cluster.close()
        await api.stop()
    need = set().union(*map(needed, api.calls))
    granted = grants(DEPLOY / "laptop" / "clusterrole.yaml")
    assert ApiCall("get", "", "pods", "portforward", "default", websocket=True) in api.calls
    assert need <= granted, f"not granted: {sorted(need - granted)}"
    assert granted <= need, f"granted, never used: {sorted(granted - need)}"
