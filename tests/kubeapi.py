"""A test Kubernetes API server: Services and EndpointSlices, list and watch.

It speaks the real URL shapes and wire format (what kubernetes-asyncio and
kubectl send and expect), keeps a global resourceVersion counter and an
event history with compaction, and has knobs to break it the ways a real
API server breaks: streams dropped, streams that go silent without closing,
500/429 answers, an outage (connection refused), a restart that starts a new
resourceVersion epoch (every old version is then 410 Gone).

LIST pages the way the real API server does: with `limit`, the first page
takes a snapshot at the current resourceVersion and answers with a
`metadata.continue` token (base64 JSON of the snapshot version and the last
key served; opaque to clients) while items remain; every page reports the
snapshot's resourceVersion, and objects created, changed or deleted while
paging do not show in the pages. A token whose snapshot was compacted away,
evicted or expired on purpose (`expire_continue_tokens`,
`expire_next_continues`) is answered 410 with a Status `reason: Expired`.
`list_calls` records each LIST (limit, continue, answer) for tests, and
`calls` every resource request as RBAC sees it (verb, group, resource,
subresource, namespace), so a test can hold a role against what was called.

Use it in-process::

    api = FakeKubeAPI()
    url = await api.start()
    api.create(service("default", "web", ports=[{"port": 80}]))
    ...
    await api.stop()

or standalone: ``python tests/kubeapi.py --port 8001 --seed objects.yaml``.
Standalone, the ``/_test/...`` control paths (see `_control`) inject faults
from another process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import contextlib
import copy
import json
import os
import re
import signal
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

Obj = dict[str, Any]

# resource -> (group prefix, apiVersion, kind)
RESOURCES: dict[str, tuple[str, str, str]] = {
    "services": ("/api/v1", "v1", "Service"),
    "pods": ("/api/v1", "v1", "Pod"),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "discovery.k8s.io/v1", "EndpointSlice"),
    "nodes": ("/api/v1", "v1", "Node"),
}
CLUSTER_SCOPED = {"nodes"}  # no namespace: stored and addressed under ""
FIELDS = ("metadata.name", "metadata.namespace")  # what fieldSelector may name
RESOURCE_OF_KIND = {kind: resource for resource, (_, _, kind) in RESOURCES.items()}

DEFAULT_WATCH_TIMEOUT = 1800.0  # seconds, when the client sends no timeoutSeconds

# List snapshots kept for continue tokens; older ones are evicted (their
# tokens then get 410 Expired, as after the real server's compaction).
SNAPSHOT_LIMIT = 64

EXPIRED_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter."
)


# ---------------------------------------------------------------- objects


def service(
    namespace: str,
    name: str,
    *,
    ports: Iterable[Mapping[str, Any]] = ({"port": 80},),
    cluster_ip: str = "10.96.0.1",
    type: str = "ClusterIP",
    labels: Mapping[str, str] | None = None,
    **spec: Any,
) -> Obj:
    """A v1 Service as the API serves it. Extra keyword arguments go into spec."""
    port_list = []
    for port in ports:
        entry = {"protocol": "TCP", **port}
        entry.setdefault("targetPort", entry["port"])
        port_list.append(entry)
    body: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": dict(labels or {})},
        "spec": {
            "type": type,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": port_list,
            "sessionAffinity": "None",
            **spec,
        },
    }
    return body


def node(name: str, zone: str | None = None, *, taints: Iterable[Mapping[str, str]] = (),
         deleting: bool = False) -> Obj:
    """A v1 Node (cluster-scoped) with a zone label, taints, a deletionTimestamp."""
    labels = {"kubernetes.io/hostname": name}
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    meta: Obj = {"name": name, "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta,
            "spec": {"taints": [dict(t) for t in taints]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def endpoint_slice(
    namespace: str,
    name: str,
    service_name: str,
    *,
    addresses: Iterable[str] = (),
    ports: Iterable[Mapping[str, Any]] = ({"name": "", "port": 80},),
    address_type: str = "IPv4",
    endpoints: Iterable[Mapping[str, Any]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """A discovery.k8s.io/v1 EndpointSlice. `addresses` makes ready endpoints;
    `endpoints` gives full entries (conditions, nodeName) instead."""
    if endpoints is None:
        endpoints = [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name, **(labels or {})},
        },
        "addressType": address_type,
        "ports": [{"protocol": "TCP", **p} for p in ports],
        "endpoints": [dict(e) for e in endpoints],
    }


def pod(namespace: str, name: str, ip: str) -> Obj:
    """A v1 Pod, as far as port-forward and targetRefs care."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}"},
        "spec": {"containers": [{"name": "main", "image": "example"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def pod_endpoint(namespace: str, name: str, ip: str, **conditions: bool) -> Obj:
    """An EndpointSlice endpoint whose targetRef names a pod."""
    return {"addresses": [ip], "conditions": {"ready": True, **conditions},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": name,
                          "uid": f"uid-{namespace}-{name}"}}


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# ---------------------------------------------------------------- selectors


@dataclass(frozen=True)
class LabelSelector:
    """The equality-based label selector grammar: `k`, `!k`, `k=v`, `k==v`, `k!=v`."""

    terms: tuple[tuple[str, str, str], ...] = ()  # (op, key, value)
    # fieldSelector terms, ("eq" | "ne", field, value); only the FIELDS every
    # resource supports (metadata.name, metadata.namespace)
    fields: tuple[tuple[str, str, str], ...] = ()

    def with_fields(self, text: str | None) -> LabelSelector:
        """This selector and a fieldSelector (`f=v`, `f==v`, `f!=v`, comma-joined)."""
        fields = []
        for raw in (text or "").split(","):
            term = raw.strip()
            if not term:
                continue
            op = "ne" if "!=" in term else "eq"
            key, value = term.replace("!=", "=").replace("==", "=").split("=", 1) \
                if "=" in term else (term, "")
            if key.strip() not in FIELDS:
                raise ValueError(f"field label not supported: {key.strip()}")
            fields.append((op, key.strip(), value.strip()))
        return LabelSelector(self.terms, tuple(fields))

    def selects(self, obj: Obj) -> bool:
        """Whether the object's labels and fields match."""
        meta = obj.get("metadata", {})
        for op, key, value in self.fields:
            actual = meta.get(key.removeprefix("metadata."), "")
            if (actual == value) != (op == "eq"):
                return False
        return self.matches(meta.get("labels"))

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        terms: list[tuple[str, str, str]] = []
        for raw in (text or "").split(","):
            term = raw.strip()
            if not term:
                continue
            if term.startswith("!"):
                terms.append(("absent", term[1:].strip(), ""))
            elif "!=" in term:
                key, value = term.split("!=", 1)
                terms.append(("ne", key.strip(), value.strip()))
            elif "==" in term:
                key, value = term.split("==", 1)
                terms.append(("eq", key.strip(), value.strip()))
            elif "=" in term:
                key, value = term.split("=", 1)
                terms.append(("eq", key.strip(), value.strip()))
            else:
                terms.append(("present", term, ""))
        for _, key, _ in terms:
            if not key or " " in key:
                raise ValueError(f"bad label selector {text!r}")
        return cls(tuple(terms))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        for op, key, value in self.terms:
            if op == "absent" and key in labels:
                return False
            if op == "present" and key not in labels:
                return False
            if op == "eq" and labels.get(key) != value:
                return False
            if op == "ne" and labels.get(key) == value:
                return False
        return True


# ---------------------------------------------------------------- server state


@dataclass
class Event:
    rv: int
    resource: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    previous: Obj | None  # for selector transitions


@dataclass(eq=False)
class Watcher:
    resource: str
    namespace: str | None
    selector: LabelSelector
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    transport: asyncio.BaseTransport | None = None
    hung: bool = False

    def sees(self, resource: str, obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        return (
            resource == self.resource
            and (self.namespace is None or meta.get("namespace") == self.namespace)
            and self.selector.selects(obj)
        )


@dataclass
class Failure:
    status: int
    retry_after: float | None


@dataclass
class ListCall:
    """One LIST request and how it was answered."""

    resource: str
    namespace: str | None
    limit: int | None  # None: no limit asked (or 0)
    continue_: str | None  # the token sent, None on a first page
    status: int = 200
    items: int = 0
    resource_version: str | None = None  # the list's metadata.resourceVersion
    more: bool = False  # the answer carried a continue token


@dataclass(frozen=True)
class ApiCall:
    """A request as RBAC sees it (the API server's RequestInfo): what a role
    must grant for it to pass."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str  # "" for the core group
    resource: str  # plural, e.g. "services"
    subresource: str = ""  # e.g. "portforward"
    namespace: str = ""  # "" for cluster-scoped requests and ones across all namespaces
    websocket: bool = False  # a GET that upgrades to a WebSocket (exec, attach, portforward)

    @property
    def rule_resource(self) -> str:
        """The name a role's rule lists: `resource` or `resource/subresource`."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


# /api/v1/... or /apis/GROUP/VERSION/..., then [namespaces/NS/]RESOURCE[/NAME[/SUBRESOURCE]]
_API_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/(?P<rest>.+)$")
_WRITE_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def api_call(method: str, path: str, query: Mapping[str, str], *,
             websocket: bool = False) -> ApiCall | None:
    """The RBAC view of a request; None for non-resource paths (/version,
    discovery, the /_test controls), which roles grant by URL, not resource."""
    found = _API_PATH.match(path)
    if found is None:
        return None
    parts = found["rest"].split("/")
    namespace = ""
    if len(parts) >= 3 and parts[0] == "namespaces":
        namespace, parts = parts[1], parts[2:]
    if len(parts) > 3:
        return None
    resource, name, subresource = [*parts, "", ""][:3]
    if method == "GET":
        verb = "get" if name else "watch" if _truthy(query.get("watch")) else "list"
    elif method == "DELETE" and not name:
        verb = "deletecollection"
    else:
        verb = _WRITE_VERBS.get(method, method.lower())
    return ApiCall(verb, found["group"] or "", resource, subresource, namespace,
                   websocket and method == "GET")


@dataclass
class Snapshot:
    """A list frozen at its first page: what every continue page is served from."""

    resource: str
    namespace: str | None
    selector: str
    rv: int
    keys: list[tuple[str, str]]  # (namespace, name), sorted
    objects: list[Obj]


class FakeKubeAPI:
    """In-memory API server for Services and EndpointSlices."""

    def __init__(self, *, history_limit: int = 10_000, bookmark_interval: float = 60.0) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (resource, ns, name) -> obj
        self.rv = 1
        self.history: deque[Event] = deque(maxlen=history_limit)
        self.compacted_rv = self.rv  # watches from below this get 410
        self.bookmark_interval = bookmark_interval
        self.watchers: set[Watcher] = set()
        self.failures: deque[Failure] = deque()
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.calls: list[ApiCall] = []  # every resource request, in RBAC terms
        self.forbidden: set[str] = set()  # resources RBAC would refuse (403)
        self.hang_new_watches = False
        self.in_outage = False
        self.list_log: list[ListCall] = []
        self.after_list: Callable[[ListCall], None] | None = None  # runs before each answer
        self._snapshots: OrderedDict[int, Snapshot] = OrderedDict()
        self._next_snapshot = 1
        self._expire_next: list[str | None] = []  # resource (None: any) per coming expiry
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.kubelet = Kubelet(self)

    # ---------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.host = host
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await self._listen(port)
        return self.url

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop_streams()
        await self.kubelet.drop_streams()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---------------------------------------------------------- objects

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, resource: str, type_: str, obj: Obj, previous: Obj | None) -> None:
        event = Event(int(obj["metadata"]["resourceVersion"]), resource, type_, obj, previous)
        if len(self.history) == self.history.maxlen:
            self.compacted_rv = self.history[0].rv
        self.history.append(event)
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(event)

    @staticmethod
    def _key(obj: Obj) -> tuple[str, str, str]:
        resource = RESOURCE_OF_KIND[obj["kind"]]
        meta = obj["metadata"]
        if resource in CLUSTER_SCOPED:
            return resource, "", meta["name"]
        return resource, meta.get("namespace", "default"), meta["name"]

    def create(self, obj: Obj) -> Obj:
        key = self._key(obj)
        if key in self.objects:
            raise KeyError(f"{key} already exists")
        return self._store(key, obj, None)

    def update(self, obj: Obj) -> Obj:
        key = self._key(obj)
        if key not in self.objects:
            raise KeyError(f"{key} does not exist")
        return self._store(key, obj, self.objects[key])

    def apply(self, obj: Obj) -> Obj:
        """Create or update."""
        key = self._key(obj)
        return self._store(key, obj, self.objects.get(key))

    def _store(self, key: tuple[str, str, str], obj: Obj, previous: Obj | None) -> Obj:
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        if key[0] not in CLUSTER_SCOPED:
            meta.setdefault("namespace", key[1])
        meta["resourceVersion"] = str(self._next_rv())
        meta.setdefault("uid", f"uid-{key[0]}-{key[1]}-{key[2]}")
        self.objects[key] = stored
        self._record(key[0], "ADDED" if previous is None else "MODIFIED", stored, previous)
        return stored

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        resource = RESOURCE_OF_KIND.get(kind, kind)
        previous = self.objects.pop((resource, namespace, name))
        gone = copy.deepcopy(previous)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record(resource, "DELETED", gone, previous)
        return gone

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        return self.objects[(RESOURCE_OF_KIND.get(kind, kind), namespace, name)]

    # ---------------------------------------------------------- faults

    def compact(self) -> None:
        """Forget the event history: every version before now is too old."""
        self.history.clear()
        self.compacted_rv = self.rv

    def drop_streams(self) -> int:
        """Abort every open watch connection (no clean end of stream)."""
        dropped = 0
        for watcher in list(self.watchers):
            if watcher.transport is not None:
                watcher.transport.abort()
                dropped += 1
            watcher.queue.put_nowait(None)
        return dropped

    def hang_streams(self, *, new_too: bool = False) -> int:
        """Open watches stop sending anything (no events, no bookmarks) but stay open."""
        for watcher in self.watchers:
            watcher.hung = True
        self.hang_new_watches = new_too
        return len(self.watchers)

    def expire_continue_tokens(self) -> int:
        """Every continue token issued so far is answered 410 Expired from now on."""
        expired = len(self._snapshots)
        self._snapshots.clear()
        return expired

    def expire_next_continues(self, count: int = 1, resource: str | None = None) -> None:
        """The next `count` continue requests (for `resource`, or any) get 410 Expired."""
        self._expire_next.extend([resource] * count)

    def list_calls(self, resource: str | None = None) -> list[ListCall]:
        """The LIST requests so far (watches excluded), oldest first."""
        return [c for c in self.list_log if resource is None or c.resource == resource]

    def forbid(self, resource: str) -> None:
        """Answer 403 for `resource` from now on, as RBAC without that rule would."""
        self.forbidden.add(resource)

    def fail_next(self, count: int, status: int = 500, retry_after: float | None = None) -> None:
        """Answer the next `count` resource requests with `status`."""
        for _ in range(count):
            self.failures.append(Failure(status, retry_after))

    async def outage_begin(self) -> None:
        """Stop listening (connection refused) and drop every stream."""
        self.in_outage = True
        self.drop_streams()
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def outage_end(self) -> None:
        self.in_outage = False
        await self._listen(self.port)

    def restart(self, epoch_jump: int = 1_000_000) -> None:
        """A new resourceVersion epoch (as after an etcd restore): old versions get 410."""
        self.rv += epoch_jump
        for obj in self.objects.values():
            obj["metadata"]["resourceVersion"] = str(self.rv)
        self.compact()
        self.drop_streams()

    @property
    def open_watches(self) -> int:
        return len(self.watchers)

    def count_requests(self, *, watch: bool | None = None, path: str | None = None) -> int:
        n = 0
        for _, req_path, query in self.requests:
            if path is not None and not req_path.startswith(path):
                continue
            if watch is not None and _truthy(query.get("watch")) != watch:
                continue
            n += 1
        return n

    # ---------------------------------------------------------- HTTP

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        query = dict(request.query)
        self.requests.append((request.method, path, query))
        call = api_call(request.method, path, query,
                        websocket=request.headers.get("Upgrade", "").lower() == "websocket")
        if call is not None:
            self.calls.append(call)
        if self.in_outage and request.transport is not None:
            request.transport.abort()  # a kept-alive connection from before the outage
            raise web.HTTPServiceUnavailable()
        if path.startswith("/_test/"):
            return self._control(path, query)
        forward = _PORTFORWARD_PATH.match(path)
        if forward is not None:
            return await self.kubelet.serve(request, forward["namespace"], forward["name"])
        if path == "/version":
            return web.json_response(_VERSION)
        if path == "/api":
            return web.json_response(
                {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [
                     {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]}
            )
        if path == "/apis":
            return web.json_response(_API_GROUPS)
        if path == "/api/v1":
            core = _resource_list("v1", "services", "Service", "svc")
            nodes = _resource_list("v1", "nodes", "Node", "no")["resources"][0]
            core["resources"].append(dict(nodes, namespaced=False))
            return web.json_response(core)
        if path == "/apis/discovery.k8s.io/v1":
            return web.json_response(
                _resource_list("discovery.k8s.io/v1", "endpointslices", "EndpointSlice", None)
            )
        route = _parse_path(path)
        if route is None:
            return _error(404, "NotFound", f"the server could not find {path}")
        resource, namespace, name = route
        if resource in self.forbidden:
            verb = "watch" if _truthy(query.get("watch")) else "list" if name is None else "get"
            return _error(403, "Forbidden",
                          f'{resource} is forbidden: User "test" cannot {verb} resource '
                          f'"{resource}" in API group "" at the cluster scope')
        if self.failures:
            failure = self.failures.popleft()
            headers = {}
            if failure.retry_after is not None:
                headers["Retry-After"] = str(int(failure.retry_after))
            reason = "TooManyRequests" if failure.status == 429 else "InternalError"
            return _error(failure.status, reason, f"injected {failure.status}", headers)
        try:
            selector = LabelSelector.parse(query.get("labelSelector")).with_fields(
                query.get("fieldSelector"))
        except ValueError as e:
            return _error(400, "BadRequest", str(e))
        if request.method == "GET":
            if name is not None:
                obj = self.objects.get((resource, namespace or "", name))
                if obj is None:
                    return _error(404, "NotFound", f'{resource} "{name}" not found')
                return web.json_response(obj)
            if _truthy(query.get("watch")):
                return await self._watch(request, resource, namespace, selector, query)
            return self._list(resource, namespace, selector, query)
        return await self._write(request, resource, namespace, name)

    def _control(self, path: str, query: Mapping[str, str]) -> web.Response:
        action = path.removeprefix("/_test/")
        if action == "drop":
            return web.json_response({"dropped": self.drop_streams()})
        if action == "hang":
            return web.json_response({"hung": self.hang_streams()})
        if action == "fail":
            retry = query.get("retryAfter")
            self.fail_next(int(query.get("count", "1")), int(query.get("status", "500")),
                           float(retry) if retry else None)
            return web.json_response({"queued": len(self.failures)})
        if action == "portforward-target":  # ?pod=ns/name&host=IP: where a pod's ports are
            self.kubelet.targets[query["pod"]] = query["host"]
            return web.json_response(dict(self.kubelet.targets))
        if action == "portforward-sessions":
            return web.json_response([list(s) for s in self.kubelet.sessions])
        if action == "restart":
            self.restart()
            return web.json_response({"resourceVersion": str(self.rv)})
        if action == "compact":
            self.compact()
            return web.json_response({"compactedResourceVersion": str(self.compacted_rv)})
        if action == "expire-continue":
            if "count" in query:
                self.expire_next_continues(int(query["count"]), query.get("resource"))
                return web.json_response({"queued": len(self._expire_next)})
            return web.json_response({"expired": self.expire_continue_tokens()})
        return _error(404, "NotFound", f"no control {action!r}")

    def _matching(self, resource: str, namespace: str | None,
                  selector: LabelSelector) -> list[Obj]:
        found = []
        for (res, ns, _), obj in sorted(self.objects.items()):
            if res != resource or (namespace is not None and ns != namespace):
                continue
            if selector.selects(obj):
                found.append(obj)
        return found

    def _list(self, resource: str, namespace: str | None, selector: LabelSelector,
              query: Mapping[str, str]) -> web.Response:
        token = query.get("continue") or None
        try:
            limit = int(query.get("limit") or 0)
            if limit < 0:
                raise ValueError
        except ValueError:
            limit = -1
        call = ListCall(resource, namespace, limit if limit > 0 else None, token)
        self.list_log.append(call)
        response = self._answer_list(call, limit, selector, query)
        call.status = response.status
        if self.after_list is not None:
            self.after_list(call)
        return response

    def _answer_list(self, call: ListCall, limit: int, selector: LabelSelector,
                     query: Mapping[str, str]) -> web.Response:
        resource, namespace = call.resource, call.namespace
        if limit < 0:
            return _error(400, "BadRequest", f"invalid limit {query.get('limit')!r}")
        wanted = query.get("resourceVersion", "")
        selector_text = query.get("labelSelector", "") + "|" + query.get("fieldSelector", "")
        if call.continue_ is not None:
            if wanted:
                return _error(400, "BadRequest",
                              "specifying resource version is not allowed when using continue")
            try:
                snapshot_id, rv, start = _decode_continue(call.continue_)
            except ValueError:
                return _error(400, "BadRequest", "continue key is not valid")
            for i, only in enumerate(self._expire_next):
                if only is None or only == resource:
                    del self._expire_next[i]
                    return _error(410, "Expired", EXPIRED_CONTINUE)
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is None or rv < self.compacted_rv:
                return _error(410, "Expired", EXPIRED_CONTINUE)
            if (snapshot.resource, snapshot.namespace, snapshot.selector) != (
                    resource, namespace, selector_text):
                return _error(400, "BadRequest", "continue key was issued for another list")
            first = bisect.bisect_right(snapshot.keys, start)
        else:
            if wanted not in ("", "0"):
                try:
                    number = int(wanted)
                except ValueError:
                    return _error(400, "BadRequest", f"invalid resourceVersion {wanted!r}")
                if number < self.compacted_rv:
                    return _error(410, "Expired",
                                  f"too old resource version: {number} ({self.compacted_rv})")
            matching = self._matching(resource, namespace, selector)
            snapshot_id = self._next_snapshot
            self._next_snapshot += 1
            snapshot = Snapshot(
                resource, namespace, selector_text, self.rv,
                [(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in matching],
                matching,  # stored objects are replaced on change, never edited
            )
            first = 0
        end = len(snapshot.objects) if limit == 0 else min(first + limit, len(snapshot.objects))
        metadata: Obj = {"resourceVersion": str(snapshot.rv)}
        if end < len(snapshot.objects):
            last = snapshot.keys[end - 1]
            metadata["continue"] = _encode_continue(snapshot_id, snapshot.rv, last)
            if selector_text == "|":  # as the real server: only for unfiltered lists
                metadata["remainingItemCount"] = len(snapshot.objects) - end
            self._snapshots[snapshot_id] = snapshot
            self._snapshots.move_to_end(snapshot_id)
            while len(self._snapshots) > SNAPSHOT_LIMIT:
                self._snapshots.popitem(last=False)
        else:
            self._snapshots.pop(snapshot_id, None)  # fully served
        _, api_version, kind = RESOURCES[resource]
        items = []
        for obj in snapshot.objects[first:end]:
            item = copy.deepcopy(obj)
            # Items of a list carry no kind/apiVersion on the wire.
            item.pop("kind", None)
            item.pop("apiVersion", None)
            items.append(item)
        call.items = len(items)
        call.resource_version = metadata["resourceVersion"]
        call.more = "continue" in metadata
        return web.json_response({
            "kind": f"{kind}List",
            "apiVersion": api_version,
            "metadata": metadata,
            "items": items,
        })

    async def _watch(self, request: web.Request, resource: str, namespace: str | None,
                     selector: LabelSelector, query: Mapping[str, str]) -> web.StreamResponse:
        timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        wanted = query.get("resourceVersion", "")
        watcher = Watcher(resource, namespace, selector, hung=self.hang_new_watches)
        watcher.transport = request.transport
        self.watchers.add(watcher)  # from here on, new events queue up
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            backlog: list[tuple[str, Obj]] = []
            if wanted in ("", "0"):
                backlog = [("ADDED", o) for o in self._matching(resource, namespace, selector)]
                start = self.rv
            else:
                try:
                    start = int(wanted)
                except ValueError:
                    start = -1
                if start < self.compacted_rv:
                    message = f"too old resource version: {wanted} ({self.compacted_rv})"
                    await _send(response, "ERROR", status(410, "Expired", message))
                    return response
                for event in self.history:
                    if event.rv > start:
                        backlog.extend(_translate(watcher, event))
            # Events in the backlog were queued too; skip those by version.
            sent_upto = self.rv
            processed = sent_upto  # every event up to here was sent or filtered out
            for type_, obj in backlog:
                await _send(response, type_, obj)
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = min(deadline, next_bookmark) - now
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    event = None
                    if watcher.hung:
                        continue
                    if time.monotonic() >= next_bookmark:
                        next_bookmark = time.monotonic() + self.bookmark_interval
                        if bookmarks:  # the queue is empty: everything so far was sent
                            await _send(response, "BOOKMARK", self._bookmark(resource, self.rv))
                    continue
                if event is None:  # dropped
                    return response
                if watcher.hung or event.rv <= sent_upto:
                    continue
                for type_, obj in _translate(watcher, event):
                    await _send(response, type_, obj)
                processed = event.rv
            if bookmarks and not watcher.hung:
                # A bookmark promises every event up to its version was sent:
                # with events still queued, only up to the last one handled.
                final = self.rv if watcher.queue.empty() else processed
                await _send(response, "BOOKMARK", self._bookmark(resource, final))
            if watcher.hung:
                # A hung stream never ends cleanly; the client must give up on it.
                await asyncio.Event().wait()
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(watcher)
        return response

    def _bookmark(self, resource: str, version: int) -> Obj:
        _, api_version, kind = RESOURCES[resource]
        return {"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": str(version)}}

    async def _write(self, request: web.Request, resource: str, namespace: str | None,
                     name: str | None) -> web.Response:
        if namespace is None:
            return _error(405, "MethodNotAllowed", "writes need a namespaced path")
        if request.method == "DELETE" and name is not None:
            try:
                return web.json_response(self.delete(resource, namespace, name))
            except KeyError:
                return _error(404, "NotFound", f'{resource} "{name}" not found')
        if request.method in ("POST", "PUT"):
            body = await request.json()
            body.setdefault("metadata", {})["namespace"] = namespace
            _, api_version, kind = RESOURCES[resource]
            body.setdefault("kind", kind)
            body.setdefault("apiVersion", api_version)
            try:
                stored = self.create(body) if request.method == "POST" else self.update(body)
            except KeyError as e:
                code = 409 if request.method == "POST" else 404
                return _error(code, "AlreadyExists" if code == 409 else "NotFound", str(e))
            return web.json_response(stored, status=201 if request.method == "POST" else 200)
        return _error(405, "MethodNotAllowed", f"{request.method} not supported")


def _translate(watcher: Watcher, event: Event) -> list[tuple[str, Obj]]:
    """The event as this watcher sees it: label changes turn into ADDED/DELETED."""
    if event.resource != watcher.resource:
        return []
    now = watcher.sees(event.resource, event.obj)
    before = event.previous is not None and watcher.sees(event.resource, event.previous)
    if event.type == "DELETED":
        return [("DELETED", event.obj)] if before else []
    if now and before:
        return [("MODIFIED", event.obj)]
    if now:
        return [("ADDED", event.obj)]
    if before:
        return [("DELETED", event.obj)]
    return []


async def _send(response: web.StreamResponse, type_: str, obj: Obj) -> None:
    line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
    await response.write(line.encode())


def _encode_continue(snapshot_id: int, rv: int, start: tuple[str, str]) -> str:
    body = {"v": "meta.k8s.io/v1", "rv": rv, "start": list(start), "snapshot": snapshot_id}
    return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()


def _decode_continue(token: str) -> tuple[int, int, tuple[str, str]]:
    """(snapshot id, snapshot rv, last key served); ValueError when it is not ours."""
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
        start = body["start"]
        if not (isinstance(start, list) and len(start) == 2
                and all(isinstance(part, str) for part in start)):
            raise ValueError("start")
        return int(body["snapshot"]), int(body["rv"]), (start[0], start[1])
    except (binascii.Error, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(str(error)) from error


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _error(code: int, reason: str, message: str,
           headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(status(code, reason, message), status=code, headers=headers)


_PORTFORWARD_PATH = re.compile(
    r"^/api/v1/namespaces/(?P<namespace>[^/]+)/pods/(?P<name>[^/]+)/portforward$")


class Kubelet:
    """`pods/NAME/portforward` as the kubelet serves it over a WebSocket.

    As kubelet's websocket.go: the subprotocols `v5.channel.k8s.io` and
    `v4.channel.k8s.io` (`protocols` may narrow them), a data channel (0) and
    an error channel (1), each opened with the port as 2 bytes little-endian;
    then the pod's bytes on channel 0, and when the pod cannot be reached, the
    kubelet's error text on channel 1 and the end of the stream. A v5 close
    signal `[255, 0]` half-closes toward the pod. Pods must exist as objects
    (404 otherwise); `forbidden` answers 403 as RBAC would. A pod's port is
    reached at `targets[namespace/name]`, a loopback address a test chose,
    else the pod's podIP.
    """

    PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")

    def __init__(self, api: FakeKubeAPI) -> None:
        self.api = api
        self.targets: dict[str, str] = {}
        self.protocols: tuple[str, ...] = self.PROTOCOLS
        self.forbidden = False
        self.token: str | None = None  # when set, a port-forward needs "Bearer TOKEN" (else 401)
        self.sessions: list[tuple[str, int, str]] = []  # (pod, port, protocol) per stream
        self._open: set[web.WebSocketResponse] = set()

    @property
    def open_streams(self) -> int:
        return len(self._open)

    async def drop_streams(self) -> None:
        """The API server drops every port-forward mid-transfer."""
        for ws in list(self._open):
            if ws._req is not None and ws._req.transport is not None:
                ws._req.transport.abort()
        self._open.clear()

    async def serve(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        bearer = request.headers.get("Authorization")
        if self.token is not None and bearer != f"Bearer {self.token}":
            return _error(401, "Unauthorized", "Unauthorized")
        if self.forbidden:
            return _error(403, "Forbidden",
                          f'pods "{name}" is forbidden: User "test" cannot create resource '
                          f'"pods/portforward" in API group "" in the namespace "{namespace}"')
        obj = self.api.objects.get(("pods", namespace, name))
        if obj is None:
            return _error(404, "NotFound", f'pods "{name}" not found')
        try:
            port = int(request.query.get("ports", ""))
        except ValueError:
            return _error(400, "BadRequest", 'query parameter "ports" is required')
        ws = web.WebSocketResponse(protocols=self.protocols, max_msg_size=0)
        await ws.prepare(request)
        self._open.add(ws)
        key = f"{namespace}/{name}"
        self.sessions.append((key, port, ws.ws_protocol or ""))
        try:
            await ws.send_bytes(bytes((0,)) + port.to_bytes(2, "little"))
            await ws.send_bytes(bytes((1,)) + port.to_bytes(2, "little"))
            host = self.targets.get(key, obj["status"]["podIP"])
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as error:
                reason = os.strerror(error.errno).lower() if error.errno else str(error)
                message = (f"error forwarding port {port} to pod {name}, uid "
                           f"{obj['metadata']['uid']}: failed to connect to localhost:{port} "
                           f"inside namespace \"{key}\", IPv4: dial tcp4 127.0.0.1:{port}: "
                           f"connect: {reason}")
                await ws.send_bytes(b"\x01" + message.encode())
                return ws
            try:
                await self._relay(ws, reader, writer)
            finally:
                writer.close()
        finally:
            self._open.discard(ws)
            await ws.close()
        return ws

    @staticmethod
    async def _relay(ws: web.WebSocketResponse, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        async def to_pod() -> None:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                    continue
                channel, payload = message.data[0], message.data[1:]
                if channel == 0:
                    writer.write(payload)
                    await writer.drain()
                elif channel == 255 and payload == b"\x00" and writer.can_write_eof():
                    writer.write_eof()

        async def from_pod() -> None:
            while data := await reader.read(32 * 1024):
                await ws.send_bytes(b"\x00" + data)

        pod_side = asyncio.ensure_future(from_pod())
        client_side = asyncio.ensure_future(to_pod())
        try:
            # The stream ends when the pod's side does (or the client goes away).
            await asyncio.wait({pod_side, client_side}, return_when=asyncio.FIRST_COMPLETED)
            if client_side.done() and not pod_side.done():
                pod_side.cancel()
        finally:
            for task in (pod_side, client_side):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _parse_path(path: str) -> tuple[str, str | None, str | None] | None:
    """(resource, namespace or None, name or None) for a resource path."""
    for resource, (prefix, _, _) in RESOURCES.items():
        if not path.startswith(prefix + "/"):
            continue
        parts = path[len(prefix) + 1:].split("/")
        if parts == [resource]:
            return resource, None, None
        if resource in CLUSTER_SCOPED and len(parts) == 2 and parts[0] == resource:
            return resource, None, parts[1]
        if len(parts) in (3, 4) and parts[0] == "namespaces" and parts[2] == resource:
            return resource, parts[1], parts[3] if len(parts) == 4 else None
    return None


def _resource_list(group_version: str, plural: str, kind: str, short: str | None) -> Obj:
    verbs = ["create", "delete", "get", "list", "update", "watch"]
    entry: Obj = {"name": plural, "singularName": kind.lower(), "namespaced": True,
                  "kind": kind, "verbs": verbs}
    if short:
        entry["shortNames"] = [short]
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [entry]}


_VERSION: Obj = {
    "major": "1", "minor": "30", "gitVersion": "v1.30.0-uproxy-test",
    "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z",
    "goVersion": "go1.22.0", "compiler": "gc", "platform": "linux/amd64",
}

_API_GROUPS: Obj = {
    "kind": "APIGroupList",
    "apiVersion": "v1",
    "groups": [{
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    }],
}


# ---------------------------------------------------------------- standalone


def load_seed(path: Path) -> Iterator[Obj]:
    """Objects from a YAML/JSON file: multi-document, or `kind: List`."""
    import yaml

    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            yield from doc["items"]
        else:
            yield doc


async def _serve(host: str, port: int, seed: Path | None, bookmark_interval: float) -> None:
    api = FakeKubeAPI(bookmark_interval=bookmark_interval)
    if seed is not None:
        for obj in load_seed(seed):
            if obj.get("kind") not in RESOURCE_OF_KIND:
                print(f"{seed}: skipping kind {obj.get('kind')!r}", file=sys.stderr)
                continue
            api.apply(obj)
    await api.start(host, port)
    print(f"kubeapi listening on {api.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await api.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="test Kubernetes API server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=Path, help="YAML/JSON file of Services and EndpointSlices")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.seed, args.bookmark_interval))


if __name__ == "__main__":
    main()
