"""The healthz and metrics HTTP servers (aiohttp), one app per bind address.

healthz (`--healthz-bind-address`, default 0.0.0.0:10256, as kube-proxy):
  /healthz  200 while the last successful sync is younger than
            2 x sync period + margin, else 503; JSON like kube-proxy's. Also
            503 while this node is being deleted or drained, so load
            balancers that probe it move traffic away (kube-proxy since 1.28).
  /livez    the same without the node's state: for a liveness probe, which
            must not restart uproxy because its node is draining.
  /readyz   503 until every required source delivered its first full view
            and one sync ran, then 200.
metrics (`--metrics-bind-address`, default 127.0.0.1:10249):
  /metrics  Prometheus text exposition
  /status   the live status page (one self-contained HTML file)
  /status.json  the same data for scripts
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal

from aiohttp import web

from uproxy.metrics import Metrics
from uproxy.model import format_hostport
from uproxy.settings import BindAddress
from uproxy.status import RunnerView, StatusInputs, TrackerView, build_status, sources_ready

log = logging.getLogger(__name__)

Kind = Literal["healthz", "metrics"]
FLAGS: dict[str, str] = {
    "healthz": "--healthz-bind-address",
    "metrics": "--metrics-bind-address",
}
HEALTHZ_MARGIN = 5.0  # seconds on top of 2 x sync period
# The classic text format every Prometheus understands (generate_latest's output).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WebBindError(Exception):
    """A server address is malformed or cannot be bound; the message is one line."""


@dataclass
class WebState:
    """What the servers read; all on the event loop, nothing copied."""

    proxier: StatusInputs
    runner: RunnerView
    tracker: TrackerView
    required_sources: Set[str]
    sync_period: float
    metrics: Metrics | None = None
    healthz_margin: float = HEALTHZ_MARGIN
    # Whether this node is going away (deletionTimestamp, drain taint).
    node_terminating: Callable[[], bool] = lambda: False
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    started: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.monotonic()


@dataclass
class WebServer:
    kind: Kind
    host: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_web(bind: BindAddress | None, kind: Kind,
                    state: WebState) -> WebServer | None:
    """Serve `kind` on `bind` (IP, port); None when `bind` is None. Raises WebBindError."""
    if bind is None:
        return None
    host, port = bind
    sock = _listen(host, port, format_hostport(host, port), FLAGS[kind])
    app = healthz_app(state) if kind == "healthz" else metrics_app(state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    server = WebServer(kind, host, sock.getsockname()[1], runner)
    if port == 0:
        log.info("%s listening on %s", kind, server.url)
    else:
        log.debug("%s listening on %s", kind, server.url)
    return server


def _listen(host: str, port: int, bind: str, flag: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (
            exc.strerror or str(exc)).lower()
        raise WebBindError(f"{flag} {bind}: {reason}") from None
    return sock


# --- healthz ----------------------------------------------------------------


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def health(state: WebState, *, node: bool = True) -> tuple[bool, dict[str, Any]]:
    """kube-proxy's rule: healthy while the last sync (or startup) is recent
    and (with `node`) this node is not being deleted or drained."""
    now = state.monotonic()
    wall = state.wall()
    last = state.runner.last_success
    since = last if last is not None else state.started
    age = max(0.0, now - since)
    threshold = 2 * state.sync_period + state.healthz_margin
    healthy = age <= threshold
    body: dict[str, Any] = {
        "lastUpdated": _rfc3339(wall - age) if last is not None else None,
        "currentTime": _rfc3339(wall),
        "nodeHealthy": healthy,
        "ageSeconds": round(age, 3),
        "thresholdSeconds": threshold,
        "syncs": state.runner.syncs,
    }
    if not healthy:
        what = "last successful sync" if last is not None else "startup without a sync"
        body["reason"] = f"{what} was {age:.1f}s ago (threshold {threshold:g}s)"
    elif node and state.node_terminating():
        healthy = body["nodeHealthy"] = False
        body["reason"] = "this node is being deleted or drained"
    return healthy, body


def readiness(state: WebState) -> tuple[bool, dict[str, Any]]:
    synced, missing = sources_ready(state.tracker, state.required_sources)
    ran = state.runner.last_success is not None
    ready = synced and ran
    body: dict[str, Any] = {"ready": ready, "sourcesMissing": missing, "synced": ran}
    if not ready:
        why = [f"waiting for the first full view of {', '.join(missing)}"] if missing else []
        if not ran:
            why.append("no sync has completed yet")
        body["reason"] = "; ".join(why)
    return ready, body


def _json(body: dict[str, Any], ok: bool) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=None) + "\n",
        status=200 if ok else 503,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def healthz_app(state: WebState) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        healthy, body = health(state)
        return _json(body, healthy)

    async def livez(request: web.Request) -> web.Response:
        healthy, body = health(state, node=False)
        return _json(body, healthy)

    async def readyz(request: web.Request) -> web.Response:
        ready, body = readiness(state)
        return _json(body, ready)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


# --- metrics and status -------------------------------------------------------


def status_page() -> bytes:
    return resources.files("uproxy").joinpath("data/status.html").read_bytes()


def metrics_app(state: WebState) -> web.Application:
    metrics = state.metrics if state.metrics is not None else Metrics(state.proxier)
    page = status_page()

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=await metrics.scrape(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def status_json(request: web.Request) -> web.Response:
        status = build_status(state.proxier, state.runner, state.tracker,
                              state.required_sources, now=state.monotonic())
        status["health"] = health(state)[1]
        # The document is built on the loop (live state); encoding can wait in a thread.
        text = await asyncio.to_thread(json.dumps, status)
        return web.Response(text=text + "\n", content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def status_html(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def index(request: web.Request) -> web.Response:
        raise web.HTTPFound("/status")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/status", status_html)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/", index)
    return app
