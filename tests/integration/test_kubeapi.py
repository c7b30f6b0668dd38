"""The test API server against kubernetes-asyncio itself: if the real client
lists, watches, resumes and fails the way it does against a cluster, the
timeline tests of the kube source mean something."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kubeapi import ApiCall, FakeKubeAPI, LabelSelector, api_call, endpoint_slice, service


@pytest.fixture
async def api_client(api: FakeKubeAPI) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration(host=api.url)
    async with client.ApiClient(configuration) as c:
        yield c


async def test_typed_list_all_and_namespaced(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    api.create(service("default", "web", ports=[{"name": "http", "port": 80}]))
    api.create(service("kube-system", "dns", cluster_ip="10.96.0.10"))
    api.create(endpoint_slice("default", "web-abc", "web", addresses=["10.1.0.1"],
                              ports=[{"name": "http", "port": 8080}]))
    core = client.CoreV1Api(api_client)
    everything = await core.list_service_for_all_namespaces()
    assert sorted(s.metadata.name for s in everything.items) == ["dns", "web"]
    assert int(everything.metadata.resource_version) == api.rv
    only_default = await core.list_namespaced_service("default")
    assert [s.metadata.name for s in only_default.items] == ["web"]
    assert only_default.items[0].spec.ports[0].name == "http"
    slices = await client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["10.1.0.1"]
    assert slices.items[0].metadata.labels["kubernetes.io/service-name"] == "web"
    version = await client.VersionApi(api_client).get_code()
    assert version.major == "1"


async def test_watch_from_list_version_sees_later_changes(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    api.create(service("default", "a"))
    core = client.CoreV1Api(api_client)
    listed = await core.list_service_for_all_namespaces()
    rv = listed.metadata.resource_version
    api.create(service("default", "b"))
    api.update(service("default", "a", cluster_ip="10.96.0.2"))
    api.delete("Service", "default", "b")
    seen = []
    async with watch.Watch() as w:
        async for event in w.stream(core.list_service_for_all_namespaces,
                                    resource_version=rv, timeout_seconds=1):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 3:
                break
    assert seen == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]


async def test_watch_ends_at_timeout_seconds_with_a_bookmark(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    types = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with watch.Watch() as w:
        async for event in w.stream(core.list_service_for_all_namespaces,
                                    resource_version=str(api.rv), timeout_seconds=1,
                                    allow_watch_bookmarks=True):
            types.append(event["type"])
    elapsed = loop.time() - started
    assert 0.9 <= elapsed < 3
    assert types and set(types) == {"BOOKMARK"}  # periodic ones and the final one
    assert len(types) >= 3


async def test_too_old_version_is_410_on_watch_and_on_list(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    api.create(service("default", "a"))
    old = str(api.rv)
    api.create(service("default", "b"))
    api.compact()
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as raised:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_service_for_all_namespaces,
                                    resource_version=old, timeout_seconds=1):
                pass
    assert raised.value.status == 410
    with pytest.raises(ApiException) as raised_list:
        await core.list_service_for_all_namespaces(resource_version=old,
                                                   resource_version_match="Exact")
    assert raised_list.value.status == 410
    listed = await core.list_service_for_all_namespaces()  # a fresh list still works
    assert len(listed.items) == 2


async def test_restart_starts_a_new_epoch(api: FakeKubeAPI, api_client: client.ApiClient) -> None:
    api.create(service("default", "a"))
    before = api.rv
    api.restart()
    assert api.rv > before
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as raised:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_service_for_all_namespaces,
                                    resource_version=str(before), timeout_seconds=1):
                pass
    assert raised.value.status == 410


async def test_label_selector_on_list_and_watch(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    api.create(service("default", "plain"))
    api.create(service("default", "other-proxy",
                       labels={"service.kubernetes.io/service-proxy-name": "x"}))
    api.create(service("default", "headless", labels={"service.kubernetes.io/headless": ""}))
    selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    core = client.CoreV1Api(api_client)
    listed = await core.list_service_for_all_namespaces(label_selector=selector)
    assert [s.metadata.name for s in listed.items] == ["plain"]
    rv = listed.metadata.resource_version
    # A service that gains the label leaves the selection: the watch says DELETED.
    api.update(service("default", "plain", labels={"service.kubernetes.io/headless": ""}))
    api.update(service("default", "other-proxy"))  # loses it: ADDED
    seen = []
    async with watch.Watch() as w:
        async for event in w.stream(core.list_service_for_all_namespaces, label_selector=selector,
                                    resource_version=rv, timeout_seconds=1):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 2:
                break
    assert seen == [("DELETED", "plain"), ("ADDED", "other-proxy")]


def test_label_selector_grammar() -> None:
    labels = {"a": "1", "b": "2"}
    assert LabelSelector.parse("a").matches(labels)
    assert not LabelSelector.parse("!a").matches(labels)
    assert LabelSelector.parse("a=1,b==2").matches(labels)
    assert not LabelSelector.parse("a!=1").matches(labels)
    assert LabelSelector.parse("!c, a").matches(labels)
    assert LabelSelector.parse("").matches({})
    with pytest.raises(ValueError):
        LabelSelector.parse("=x")


async def test_injected_failures_and_retry_after(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    api.fail_next(1, 500)
    api.fail_next(1, 429, retry_after=3)
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as first:
        await core.list_service_for_all_namespaces()
    assert first.value.status == 500
    with pytest.raises(ApiException) as second:
        await core.list_service_for_all_namespaces()
    assert second.value.status == 429
    assert second.value.headers["Retry-After"] == "3"
    assert (await core.list_service_for_all_namespaces()).items == []


async def _open_raw_watch(api: FakeKubeAPI, session: aiohttp.ClientSession,
                          **params: str) -> aiohttp.ClientResponse:
    query = {"watch": "true", "resourceVersion": str(api.rv), **params}
    return await session.get(f"{api.url}/api/v1/services", params=query)


async def test_drop_aborts_the_stream(api: FakeKubeAPI) -> None:
    async with aiohttp.ClientSession() as session:
        response = await _open_raw_watch(api, session)
        for _ in range(50):
            if api.open_watches:
                break
            await asyncio.sleep(0.02)
        assert api.drop_streams() == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.content.readline(), 2)


async def test_hung_stream_stays_open_and_silent(api: FakeKubeAPI) -> None:
    async with aiohttp.ClientSession() as session:
        response = await _open_raw_watch(api, session, allowWatchBookmarks="true",
                                         timeoutSeconds="1")
        first = json.loads(await asyncio.wait_for(response.content.readline(), 2))
        assert first["type"] == "BOOKMARK"
        api.hang_streams()
        api.create(service("default", "late"))
        with pytest.raises(TimeoutError):
            # Past timeoutSeconds, yet neither data nor an end of stream.
            await asyncio.wait_for(response.content.readline(), 1.5)
        response.close()


async def test_outage_refuses_connections(api: FakeKubeAPI) -> None:
    await api.outage_begin()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{api.url}/api/v1/services")
        await api.outage_end()
        async with session.get(f"{api.url}/api/v1/services") as response:
            body: dict[str, Any] = await response.json()
    assert body["kind"] == "ServiceList"


async def test_http_writes_generate_events(api: FakeKubeAPI) -> None:
    async with aiohttp.ClientSession() as session:
        path = f"{api.url}/api/v1/namespaces/demo/services"
        async with session.post(path, json=service("demo", "x")) as created:
            assert created.status == 201
        async with session.delete(f"{path}/x") as deleted:
            assert deleted.status == 200
    assert [e.type for e in api.history] == ["ADDED", "DELETED"]


# ---------------------------------------------------------------- paginated LIST


def _names(listed: Any) -> list[str]:
    return [f"{o.metadata.namespace}/{o.metadata.name}" for o in listed.items]


async def test_paged_list_is_a_consistent_snapshot(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    for i in range(5):
        api.create(service("default", f"s{i}"))
    core = client.CoreV1Api(api_client)
    first = await core.list_service_for_all_namespaces(limit=2)
    snapshot_rv = first.metadata.resource_version
    assert _names(first) == ["default/s0", "default/s1"]
    assert first.metadata._continue and first.metadata.remaining_item_count == 3
    # Changes after the first page do not show in the pages that follow.
    api.delete("Service", "default", "s3")
    api.create(service("default", "s2a"))
    api.update(service("default", "s4", cluster_ip="10.96.9.9"))
    second = await core.list_service_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    third = await core.list_service_for_all_namespaces(limit=2, _continue=second.metadata._continue)
    assert _names(second) == ["default/s2", "default/s3"]
    assert _names(third) == ["default/s4"]
    assert third.items[0].spec.cluster_ip == "10.96.0.1"  # as it was at the snapshot
    assert not third.metadata._continue
    assert {p.metadata.resource_version for p in (first, second, third)} == {snapshot_rv}
    assert int(snapshot_rv) < api.rv
    assert [(c.limit, c.continue_ is not None, c.items, c.more)
            for c in api.list_calls("services")] == [
        (2, False, 2, True), (2, True, 2, True), (2, True, 1, False)]
    # Without a limit, one answer with everything as it is now.
    whole = await core.list_service_for_all_namespaces()
    assert _names(whole) == ["default/s0", "default/s1", "default/s2", "default/s2a", "default/s4"]
    assert whole.metadata._continue is None and int(whole.metadata.resource_version) == api.rv


async def test_paged_list_namespaced_and_selected(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    for i in range(3):
        api.create(endpoint_slice("a", f"e{i}", "web"))
        api.create(endpoint_slice("b", f"e{i}", "web"))
    api.create(endpoint_slice("a", "e9", "web", labels={"service.kubernetes.io/headless": ""}))
    discovery = client.DiscoveryV1Api(api_client)
    selector = "!service.kubernetes.io/headless"
    seen: list[str] = []
    token = None
    for _ in range(10):
        page = await discovery.list_namespaced_endpoint_slice(
            "a", limit=2, label_selector=selector, **({"_continue": token} if token else {}))
        seen += _names(page)
        assert page.metadata.remaining_item_count is None  # not told for selected lists
        token = page.metadata._continue
        if not token:
            break
    assert seen == ["a/e0", "a/e1", "a/e2"]
    assert [c.namespace for c in api.list_calls("endpointslices")] == ["a", "a"]


async def test_expired_continue_is_410_expired(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    for i in range(3):
        api.create(service("default", f"s{i}"))
    core = client.CoreV1Api(api_client)
    first = await core.list_service_for_all_namespaces(limit=1)
    token = first.metadata._continue
    assert api.expire_continue_tokens() == 1
    with pytest.raises(ApiException) as raised:
        await core.list_service_for_all_namespaces(limit=1, _continue=token)
    assert raised.value.status == 410
    body = json.loads(raised.value.body)
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "Expired", 410)
    # Expiring the next continue request only, for one resource.
    api.expire_next_continues(1, resource="services")
    fresh = await core.list_service_for_all_namespaces(limit=1)
    with pytest.raises(ApiException) as again:
        await core.list_service_for_all_namespaces(limit=1, _continue=fresh.metadata._continue)
    assert again.value.status == 410
    fresh = await core.list_service_for_all_namespaces(limit=1)
    rest = await core.list_service_for_all_namespaces(limit=5, _continue=fresh.metadata._continue)
    assert _names(rest) == ["default/s1", "default/s2"]
    # A compaction past the snapshot's version expires its tokens too.
    fresh = await core.list_service_for_all_namespaces(limit=1)
    api.create(service("default", "s3"))
    api.compact()
    with pytest.raises(ApiException) as compacted:
        await core.list_service_for_all_namespaces(limit=1, _continue=fresh.metadata._continue)
    assert compacted.value.status == 410
    assert [c.status for c in api.list_calls()] == [200, 410, 200, 410, 200, 200, 200, 410]


async def test_bad_continue_and_limit_are_400(
    api: FakeKubeAPI, api_client: client.ApiClient
) -> None:
    api.create(service("default", "a"))
    api.create(service("default", "b"))
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as garbage:
        await core.list_service_for_all_namespaces(limit=1, _continue="not-a-token")
    assert garbage.value.status == 400
    first = await core.list_service_for_all_namespaces(limit=1)
    with pytest.raises(ApiException) as other_list:
        await core.list_namespaced_service("default", limit=1, _continue=first.metadata._continue)
    assert other_list.value.status == 400
    with pytest.raises(ApiException) as with_rv:
        await core.list_service_for_all_namespaces(limit=1, _continue=first.metadata._continue,
                                                   resource_version="5")
    assert with_rv.value.status == 400
    async with (aiohttp.ClientSession() as session,
                session.get(f"{api.url}/api/v1/services", params={"limit": "-1"}) as bad):
        assert bad.status == 400


# The RBAC view of requests, as the API server's RequestInfo reads them.
@pytest.mark.parametrize(("method", "path", "query", "websocket", "call"), [
    ("GET", "/api/v1/services", {}, False, ApiCall("list", "", "services")),
    ("GET", "/api/v1/services", {"watch": "true"}, False, ApiCall("watch", "", "services")),
    ("GET", "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices", {"watch": "1"}, False,
     ApiCall("watch", "discovery.k8s.io", "endpointslices", namespace="a")),
    ("GET", "/api/v1/nodes", {"fieldSelector": "metadata.name=n"}, False,
     ApiCall("list", "", "nodes")),
    ("GET", "/api/v1/nodes/n", {}, False, ApiCall("get", "", "nodes")),
    ("GET", "/api/v1/namespaces/a/pods/p/portforward", {"ports": "80"}, True,
     ApiCall("get", "", "pods", "portforward", "a", websocket=True)),
    ("POST", "/api/v1/namespaces/a/pods/p/portforward", {}, False,
     ApiCall("create", "", "pods", "portforward", "a")),
    ("POST", "/api/v1/namespaces/a/events", {}, False, ApiCall("create", "", "events", "", "a")),
    ("DELETE", "/api/v1/namespaces/a/services", {}, False,
     ApiCall("deletecollection", "", "services", "", "a")),
    ("GET", "/version", {}, False, None),
    ("GET", "/apis/discovery.k8s.io/v1", {}, False, None),
    ("GET", "/_test/drop", {}, False, None),
])
def test_requests_are_recorded_as_rbac_sees_them(
    method: str, path: str, query: dict[str, str], websocket: bool, call: ApiCall | None
) -> None:
    assert api_call(method, path, query, websocket=websocket) == call
