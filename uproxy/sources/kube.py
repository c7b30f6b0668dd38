"""The Kubernetes source: list+watch Services, EndpointSlices and this Node.

One loop per resource (and per namespace when namespaces are given) lists,
in pages of LIST_PAGE_SIZE as client-go's pager does, so one LIST does not
hold the API server's memory; the pages are one consistent snapshot and the
sink hears of nothing until the last page is in. It then watches from the
list's resourceVersion with bookmarks, a server-side
`timeoutSeconds` and a client read timeout longer than it, so a stream that
goes silent without closing is noticed. A watch that ends normally is
re-opened from the last version seen (bookmarks move it forward). 410 Gone
means the history is gone: relist and report only what differs from what
was known, so unchanged services do not flap. Every other fault (refused,
5xx, 429, a dropped or silent stream) is retried with capped exponential
backoff and jitter; the sink keeps serving the last known state meanwhile.

On a node (rules mode) a third loop watches this node's own Node object
(`fieldSelector=metadata.name=NODE`), for its zone (topology hints) and
whether it is going away (health checks): only that one object, never the
cluster's nodes.

kubernetes-asyncio provides configuration (kubeconfig, in-cluster), auth,
TLS and the list/watch calls; objects are read as raw JSON and converted by
`uproxy.sources.objects`, which is both faster than the generated models and
the same code the services file uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config

from uproxy.model import EndpointSlice, Node, ObjectName, Service
from uproxy.sources.base import Source, SourceCounters, SourceSink, replace_all
from uproxy.sources.objects import (
    ObjectError,
    node_from_dict,
    service_from_dict,
    slice_from_dict,
)

log = logging.getLogger("uproxy.kube")

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
NODES = "nodes"
RESOURCES = (SERVICES, ENDPOINT_SLICES, NODES)
_KIND = {SERVICES: "Service", ENDPOINT_SLICES: "EndpointSlice", NODES: "Node"}

# kube-proxy's selector: services handed to another proxy, and headless ones,
# are not even fetched. EndpointSlices carry the same labels (the controller
# copies them), so the same selector applies to both.
DEFAULT_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


def label_selector(service_proxy_name: str | None) -> str:
    """The selector for --service-proxy-name: only the services labelled for us."""
    if service_proxy_name is None:
        return DEFAULT_LABEL_SELECTOR
    return (f"service.kubernetes.io/service-proxy-name={service_proxy_name},"
            "!service.kubernetes.io/headless")

# Objects per LIST page (client-go's pager default). A continue token that
# expired while paging (410 Expired: the snapshot was compacted away) is
# followed by one list without a limit, as client-go's FullListIfExpired.
LIST_PAGE_SIZE = 500

# A watch that ends normally sooner than this is treated as a fault (backoff),
# so a server that closes every stream at once is not hammered.
MIN_HEALTHY_WATCH = 1.0

# A server's Retry-After is honoured even past the backoff cap, up to this.
RETRY_AFTER_LIMIT = 300.0

Model = Service | EndpointSlice | Node


class KubeConfigError(Exception):
    """No usable cluster configuration; the message is one line."""


async def load_kube_config(
    *,
    kubeconfig: str | None = None,
    master: str | None = None,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> kube_client.Configuration:
    """Client configuration the way kube-proxy finds it.

    `--kubeconfig` wins (with `--master` overriding its server); `--master`
    alone talks to that URL without credentials; otherwise `KUBECONFIG`, then
    in-cluster (a pod's service account), then `~/.kube/config`.
    """
    environ = os.environ if environ is None else environ
    configuration = kube_client.Configuration()
    in_cluster = bool(environ.get("KUBERNETES_SERVICE_HOST"))
    path = kubeconfig or environ.get("KUBECONFIG") or None
    flag = "--kubeconfig" if kubeconfig else "KUBECONFIG"
    if path is None and master is None and not in_cluster:
        default = Path(environ.get("HOME") or Path.home()) / ".kube" / "config"
        if default.exists():
            path = str(default)
    try:
        if path is not None:
            for part in path.split(os.pathsep):
                if part and not Path(part).expanduser().exists():
                    raise KubeConfigError(f"{flag}: {part}: no such file")
            await kube_config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration,
                persist_config=False,
            )
        elif master is None:
            if not in_cluster:
                raise KubeConfigError(
                    "no cluster configuration: give --kubeconfig, --master or --services, "
                    "set KUBECONFIG, or run in a pod"
                )
            kube_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except KubeConfigError:
        raise
    except Exception as error:  # the loaders raise many kinds; all mean "unusable"
        where = path or "in-cluster configuration"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KubeConfigError(f"{where}: {first_line}") from error
    if master is not None:
        configuration.host = master.rstrip("/")
    return configuration


class _Gone(Exception):
    """410: the version we hold is no longer in the server's history."""


class _Expired(Exception):
    """410 on a continue request: the list's snapshot is gone; list again."""


class _Fault(Exception):
    """A transient failure: retry with backoff."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Backoff:
    """Capped exponential backoff with jitter: each delay is in [d/2, d]."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self, at_least: float | None = None) -> float:
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempt, 30))
        self.attempt += 1
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if at_least is not None:
            delay = max(delay, min(at_least, RETRY_AFTER_LIMIT))
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class _Loop:
    """State of one list+watch loop: one resource, one namespace or all."""

    resource: str
    namespace: str | None
    known: dict[ObjectName, Any] = field(default_factory=dict)
    resource_version: str | None = None  # None: list first
    listed: bool = False
    failing: str | None = None  # the fault being retried, for state-change logs
    failing_since: float = 0.0
    retries: int = 0

    @property
    def label(self) -> str:
        return self.resource if self.namespace is None else f"{self.resource} in {self.namespace}"


@dataclass
class _Listing:
    """One list being read page by page; reported only when complete."""

    fresh: dict[ObjectName, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # bad objects, reported at the end
    resource_version: str = ""
    pages: int = 0


class KubeSource(Source):
    """Services and EndpointSlices from a Kubernetes API server."""

    name = "kube"

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        master: str | None = None,
        context: str | None = None,
        namespaces: Sequence[str] = (),
        watch_timeout: float = 300,
        read_timeout: float | None = None,
        connect_timeout: float = 10,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30,
        label_selector: str = DEFAULT_LABEL_SELECTOR,
        configuration: kube_client.Configuration | None = None,
        environ: Mapping[str, str] | None = None,
        node_name: str | None = None,
    ) -> None:
        """`node_name`: watch this Node too (its zone, whether it is going away)."""
        if watch_timeout < 1:
            raise ValueError("watch_timeout must be at least 1 second")
        if read_timeout is None:
            read_timeout = watch_timeout + max(10.0, watch_timeout / 10)
        if read_timeout <= watch_timeout:
            raise ValueError("read_timeout must be longer than watch_timeout")
        self.kubeconfig = kubeconfig
        self.master = master
        self.context = context
        self.namespaces = tuple(dict.fromkeys(namespaces))
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.label_selector = label_selector
        self.node_name = node_name or None
        self._configuration = configuration
        self._environ = environ
        resources = RESOURCES if self.node_name is not None else (SERVICES, ENDPOINT_SLICES)
        # Counters, per resource, for metrics and tests.
        self.watches: dict[str, int] = dict.fromkeys(resources, 0)  # watch requests made
        self.watch_restarts: dict[str, int] = dict.fromkeys(resources, 0)  # broke, reopened
        self.relists: dict[str, int] = dict.fromkeys(resources, 0)  # lists after the first
        self.list_pages: dict[str, int] = dict.fromkeys(resources, 0)  # LIST requests answered
        self.expired_lists: dict[str, int] = dict.fromkeys(resources, 0)  # continue got 410
        self.errors: dict[str, int] = dict.fromkeys(resources, 0)  # faults retried
        self.events: dict[str, int] = dict.fromkeys(resources, 0)  # watch events applied
        self.bad_objects: dict[str, int] = dict.fromkeys(resources, 0)
        self.synced = False
        self.last_error: str | None = None
        self._loops: list[_Loop] = []

    def counters(self) -> SourceCounters:
        return SourceCounters(watch_restarts=dict(self.watch_restarts),
                              relists=dict(self.relists), list_pages=dict(self.list_pages),
                              expired_lists=dict(self.expired_lists))

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for /status.json."""
        return {
            "synced": self.synced,
            "last_error": self.last_error,
            "failing": {lp.label: lp.failing for lp in self._loops if lp.failing},
            "resource_versions": {lp.label: lp.resource_version for lp in self._loops},
            "watches": dict(self.watches),
            "watch_restarts": dict(self.watch_restarts),
            "relists": dict(self.relists),
            "list_pages": dict(self.list_pages),
            "expired_lists": dict(self.expired_lists),
            "errors": dict(self.errors),
            "events": dict(self.events),
        }

    async def prepare(self) -> None:
        """Load the cluster configuration now, so a bad one fails startup.

        Raises KubeConfigError (one line). `run` calls it when nobody did.
        """
        if self._configuration is None:
            self._configuration = await load_kube_config(
                kubeconfig=self.kubeconfig, master=self.master, context=self.context,
                environ=self._environ,
            )

    @property
    def configuration(self) -> kube_client.Configuration:
        """The client configuration `prepare` loaded (port-forward dials with it too)."""
        if self._configuration is None:
            raise RuntimeError("KubeSource.configuration before prepare()")
        return self._configuration

    async def run(self, sink: SourceSink) -> None:
        await self.prepare()
        configuration = self._configuration
        assert configuration is not None
        api_client = kube_client.ApiClient(configuration)
        try:
            core = kube_client.CoreV1Api(api_client)
            discovery = kube_client.DiscoveryV1Api(api_client)
            scopes: Sequence[str | None] = self.namespaces or (None,)
            self._loops = [_Loop(resource, ns) for resource in (SERVICES, ENDPOINT_SLICES)
                           for ns in scopes]
            if self.node_name is not None:
                self._loops.append(_Loop(NODES, None))
            log.info(
                "kube: watching services and endpointslices on %s (%s)%s",
                configuration.host,
                "namespaces " + ", ".join(self.namespaces) if self.namespaces
                else "all namespaces",
                f", and node {self.node_name}" if self.node_name is not None else "",
            )
            async with asyncio.TaskGroup() as tasks:
                for loop_state in self._loops:
                    call = self._caller(core, discovery, loop_state)
                    tasks.create_task(self._run_loop(loop_state, call, sink))
        finally:
            await api_client.close()

    def _caller(
        self, core: Any, discovery: Any, loop_state: _Loop
    ) -> Callable[..., Awaitable[aiohttp.ClientResponse]]:
        ns = loop_state.namespace
        if loop_state.resource == NODES:
            # One object by name: the services' label selector does not apply.
            field_selector = f"metadata.name={self.node_name}"
            return lambda label_selector=None, **kw: core.list_node(
                field_selector=field_selector, **kw)
        if loop_state.resource == SERVICES:
            if ns is None:
                return core.list_service_for_all_namespaces  # type: ignore[no-any-return]
            return lambda **kw: core.list_namespaced_service(ns, **kw)
        if ns is None:
            return discovery.list_endpoint_slice_for_all_namespaces  # type: ignore[no-any-return]
        return lambda **kw: discovery.list_namespaced_endpoint_slice(ns, **kw)

    # ------------------------------------------------------------ the loop

    async def _run_loop(
        self,
        state: _Loop,
        call: Callable[..., Awaitable[aiohttp.ClientResponse]],
        sink: SourceSink,
    ) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_cap)
        gone_in_a_row = 0
        while True:
            watching = False
            try:
                if state.resource_version is None:
                    await self._list(state, call, sink)
                    self._recovered(state, backoff)
                    if not state.listed:
                        state.listed = True
                        self._check_synced(sink)
                watching = True
                started = time.monotonic()
                delivered = await self._watch(state, call, sink, backoff)
                gone_in_a_row = 0
                if delivered == 0 and time.monotonic() - started < MIN_HEALTHY_WATCH:
                    await asyncio.sleep(backoff.next())
            except _Gone:
                self.relists[state.resource] += 1
                log.info("kube: %s: resourceVersion %s expired (410); relisting",
                         state.label, state.resource_version)
                state.resource_version = None
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # list, watch, 410 again: do not spin
                    await asyncio.sleep(backoff.next())
            except _Fault as fault:
                if watching:
                    self.watch_restarts[state.resource] += 1
                self.errors[state.resource] += 1
                self._failed(state, fault.reason, sink)
                self._check_synced(sink)
                await asyncio.sleep(backoff.next(fault.retry_after))

    def _check_synced(self, sink: SourceSink) -> None:
        """Synced once services and slices are listed. The Node is awaited
        only while it lists without fault: a ClusterRole from before uproxy
        watched nodes (403) costs topology hints, not the service proxy."""
        if self.synced:
            return
        if all(lp.listed or (lp.resource == NODES and lp.failing is not None)
               for lp in self._loops):
            self.synced = True
            log.info("kube: first full list of services and endpointslices done")
            sink.on_synced(self.name)

    def _request_timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    async def _open(
        self, call: Callable[..., Awaitable[aiohttp.ClientResponse]], **params: Any
    ) -> aiohttp.ClientResponse:
        try:
            response = await call(
                label_selector=self.label_selector or None,
                _preload_content=False,
                _request_timeout=self._request_timeout(),
                **params,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise _Fault(_describe(error)) from error
        if response.status == 410:
            response.close()
            raise _Gone()
        if not 200 <= response.status < 300:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            try:
                body = await response.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                body = b""
            finally:
                response.close()
            raise _Fault(f"HTTP {response.status}{_status_message(body)}", retry_after)
        return response

    async def _list(
        self,
        state: _Loop,
        call: Callable[..., Awaitable[aiohttp.ClientResponse]],
        sink: SourceSink,
    ) -> None:
        """List every object, then report what differs from what was known.

        Nothing reaches the sink before the last page is in: a list that
        fails or expires halfway is dropped whole, so the sink never sees
        objects missing that only sat on pages not fetched yet.
        """
        try:
            listing = await self._list_pages(state, call, LIST_PAGE_SIZE)
        except _Expired:
            # The snapshot was compacted away between pages: paging took
            # longer than the server keeps history. Paging again from page one
            # would likely expire again for the same reason; one list without
            # a limit cannot (client-go's pager falls back the same way).
            self.expired_lists[state.resource] += 1
            log.info("kube: %s: continue token expired while paging (410); "
                     "listing again in one page", state.label)
            listing = await self._list_pages(state, call, None)
        for message in listing.errors:
            self._bad_object(state, message, sink)
        changes = replace_all(state.known, listing.fresh, self._reporter(state, sink))
        state.resource_version = listing.resource_version
        log.log(
            logging.INFO if state.listed else logging.DEBUG,
            "kube: listed %d %s at resourceVersion %s in %d page(s) (%d changes)",
            len(listing.fresh), state.label, listing.resource_version, listing.pages, changes,
        )

    async def _list_pages(
        self,
        state: _Loop,
        call: Callable[..., Awaitable[aiohttp.ClientResponse]],
        limit: int | None,
    ) -> _Listing:
        """All pages of one list (one page when `limit` is None), converted, unreported.

        Raises _Expired for a 410 on a continue request, _Gone for one on the
        first page, _Fault for anything else.
        """
        listing = _Listing()
        token = ""
        while True:
            params: dict[str, Any] = {}
            if limit is not None:
                params["limit"] = limit
            if token:
                params["_continue"] = token
            try:
                body = await self._read_list(call, **params)
            except _Gone:
                if token:
                    raise _Expired() from None
                raise
            self.list_pages[state.resource] += 1
            listing.pages += 1
            try:
                metadata = body["metadata"]
                version = metadata["resourceVersion"]
                following = metadata.get("continue") or ""
                items = body.get("items") or []
                if not isinstance(following, str) or not isinstance(items, list):
                    raise TypeError("continue or items")
            except (KeyError, TypeError, AttributeError) as error:
                raise _Fault(f"malformed list response ({error})") from error
            for item in items:
                self._collect(state, item, listing)
            # Every page reports the snapshot's version; the last one is the
            # version the whole list is consistent at.
            listing.resource_version = str(version)
            if not following:
                return listing
            if following == token:
                raise _Fault("malformed list response (the same continue token twice)")
            token = following

    async def _read_list(
        self, call: Callable[..., Awaitable[aiohttp.ClientResponse]], **params: Any
    ) -> Any:
        response = await self._open(call, **params)
        try:
            raw = await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise _Fault(_describe(error)) from error
        finally:
            response.close()
        try:
            return json.loads(raw)
        except ValueError as error:
            raise _Fault(f"malformed list response ({error})") from error

    def _collect(self, state: _Loop, item: Any, listing: _Listing) -> None:
        key = _object_key(item, state.resource != NODES)
        converted = self._converted(state, item)
        if isinstance(converted, str):
            listing.errors.append(converted)
            if key is not None and key in state.known:
                listing.fresh[key] = state.known[key]  # a bad update keeps the last good one
        else:
            listing.fresh[converted.key] = converted

    async def _watch(
        self,
        state: _Loop,
        call: Callable[..., Awaitable[aiohttp.ClientResponse]],
        sink: SourceSink,
        backoff: Backoff,
    ) -> int:
        """Follow one watch stream until it ends; returns how many events it carried."""
        self.watches[state.resource] += 1
        response = await self._open(
            call,
            watch=True,
            resource_version=state.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(self.watch_timeout)),
        )
        self._recovered(state, backoff)
        report = self._reporter(state, sink)
        delivered = 0
        try:
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ServerTimeoutError, TimeoutError) as error:
                    raise _Fault(f"watch silent for {self.read_timeout:g}s") from error
                except (aiohttp.ClientError, OSError) as error:
                    raise _Fault("watch stream dropped") from error
                if not line:
                    return delivered
                if not line.strip():
                    continue
                delivered += 1
                self._apply_event(state, line, sink, report)
        finally:
            response.close()

    def _apply_event(
        self,
        state: _Loop,
        line: bytes,
        sink: SourceSink,
        report: Callable[[Any, Any], None],
    ) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
            version = (obj.get("metadata") or {}).get("resourceVersion")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise _Fault(f"malformed watch event ({error})") from error
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise _Fault(f"watch error {code}{_status_message(json.dumps(obj).encode())}")
        if kind == "BOOKMARK":
            if version:
                state.resource_version = str(version)
            return
        self.events[state.resource] += 1
        if kind == "DELETED":
            key = _object_key(obj, state.resource != NODES)
            if key is not None and key in state.known:
                report(state.known.pop(key), None)
        elif kind in ("ADDED", "MODIFIED"):
            converted = self._convert(state, obj, sink)
            if converted is not None:
                previous = state.known.get(converted.key)
                if previous != converted:
                    state.known[converted.key] = converted
                    report(previous, converted)
        else:
            log.debug("kube: %s: ignoring watch event type %r", state.label, kind)
        if version:
            state.resource_version = str(version)

    # ------------------------------------------------------------ helpers

    def _convert(self, state: _Loop, obj: Mapping[str, Any], sink: SourceSink) -> Model | None:
        converted = self._converted(state, obj)
        if isinstance(converted, str):
            self._bad_object(state, converted, sink)
            return None
        return converted

    @staticmethod
    def _converted(state: _Loop, obj: Any) -> Model | str:
        """The model object, or the one-line message saying why it is bad."""
        key = _object_key(obj, state.resource != NODES)
        kind = _KIND[state.resource]
        where = f"kube {kind} {key}" if key is not None else f"kube {kind}"
        try:
            if state.resource == SERVICES:
                return service_from_dict(obj, where)
            if state.resource == NODES:
                return node_from_dict(obj, where)
            return slice_from_dict(obj, where)
        except ObjectError as error:
            return str(error)

    def _bad_object(self, state: _Loop, message: str, sink: SourceSink) -> None:
        self.bad_objects[state.resource] += 1
        log.warning("%s (ignored; the last good version keeps serving)", message)
        sink.on_source_error(self.name, message)

    @staticmethod
    def _reporter(state: _Loop, sink: SourceSink) -> Callable[[Any, Any], None]:
        if state.resource == NODES:
            return sink.on_node
        return sink.on_service if state.resource == SERVICES else sink.on_slice

    def _failed(self, state: _Loop, reason: str, sink: SourceSink) -> None:
        self.last_error = f"{state.label}: {reason}"
        if state.failing is None:
            state.failing = reason
            state.failing_since = time.monotonic()
            state.retries = 0
            message = f"{state.label}: {reason}; serving the last known state, retrying"
            log.warning("kube: %s", message)
            sink.on_source_error(self.name, message)
        else:
            state.retries += 1
            log.debug("kube: %s: still failing (%s), retry %d", state.label, reason,
                      state.retries)

    def _recovered(self, state: _Loop, backoff: Backoff) -> None:
        backoff.reset()
        if state.failing is not None:
            log.info("kube: %s: recovered after %d retries in %.1fs (was: %s)", state.label,
                     state.retries, time.monotonic() - state.failing_since, state.failing)
            state.failing = None


def _object_key(obj: Mapping[str, Any], namespaced: bool = True) -> ObjectName | None:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    name = meta.get("name")
    namespace = (meta.get("namespace") or "default") if namespaced else ""
    if not isinstance(name, str) or not isinstance(namespace, str):
        return None
    return ObjectName(namespace, name)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; the backoff decides


def _status_message(body: bytes) -> str:
    """': <message>' from a Kubernetes Status body, or nothing."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if isinstance(message, str) and message else ""


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect to {error.host}:{error.port} ({error.os_error.strerror or error})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "connection closed mid-response"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
