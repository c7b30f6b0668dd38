"""Health check node ports: what a cloud load balancer probes on each node.

A LoadBalancer service with `externalTrafficPolicy: Local` gets a
`healthCheckNodePort` from the API server. Its load balancer sends traffic
only to nodes that answer 200 there, so that traffic is never sent to a node
without a local endpoint (where policy Local would drop it). As kube-proxy
does, every node serves, on that port and any path:

    200 (or 503) application/json
    X-Load-Balancing-Endpoint-Weight: N
    {"service": {"namespace": "ns", "name": "name"}, "localEndpoints": N,
     "serviceProxyHealthy": true}

200 when this node has ready endpoints of the service and the proxy is
healthy; 503 otherwise, and 503 while this node is being deleted or drained
(deletionTimestamp, or the cluster autoscaler's ToBeDeletedByClusterAutoscaler
taint), so the load balancer moves traffic away before the node goes.

One aiohttp runner serves every port (a site each); the proxier hands over
the wanted ports after each sync. A port that cannot be bound is one log
line and is tried again at the next sync; the others serve.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Callable, Mapping

from aiohttp import web

from uproxy.model import HealthCheck, ObjectName

log = logging.getLogger(__name__)


def health_check_body(service: ObjectName, local_endpoints: int, healthy: bool) -> str:
    """The JSON kube-proxy answers with, field for field."""
    return json.dumps({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": healthy,
    }, indent=2)


def _listen(port: int) -> socket.socket:
    """A listening socket on every address of the node, both families when it can."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 here
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        else:
            sock.bind(("0.0.0.0", port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HealthCheckServer:
    """Serves each wanted health check node port until it is no longer wanted.

    `healthy()` is the proxy's own health (recent syncs) and this node not
    going away; it is asked at each request.
    """

    def __init__(self, healthy: Callable[[], bool], *,
                 listen: Callable[[int], socket.socket] = _listen) -> None:
        self._healthy = healthy
        self._listen = listen
        self._checks: dict[int, tuple[ObjectName, int]] = {}  # port -> service, count
        self._sites: dict[int, web.SockSite] = {}
        self._failed: dict[int, str] = {}  # port -> why it is not served (said once)
        self._runner: web.AppRunner | None = None

    @property
    def served(self) -> Mapping[int, ObjectName]:
        """The ports served now, and whose they are."""
        return {port: self._checks[port][0] for port in self._sites}

    @property
    def unserved(self) -> Mapping[int, str]:
        return dict(self._failed)

    async def update(self, checks: Mapping[ObjectName, HealthCheck]) -> None:
        """Serve exactly these checks: open new ports, close gone ones, and
        answer with the new counts from now on."""
        wanted = {check.node_port: (service, check.local_endpoints)
                  for service, check in sorted(checks.items())}
        self._checks = wanted
        for port in [p for p in self._sites if p not in wanted]:
            await self._sites.pop(port).stop()
            log.info("health check node port %d closed", port)
        for port in [p for p in self._failed if p not in wanted]:
            del self._failed[port]
        for port, (service, _) in wanted.items():
            if port not in self._sites:
                await self._open(port, service)

    async def _open(self, port: int, service: ObjectName) -> None:
        runner = await self._runner_started()
        try:
            sock = self._listen(port)
        except OSError as error:
            reason = ("address already in use" if error.errno == errno.EADDRINUSE
                      else (error.strerror or str(error)).lower())
            if self._failed.get(port) != reason:
                log.warning("%s: health check node port %d not served: %s (retried at "
                            "each sync)", service, port, reason)
            self._failed[port] = reason
            return
        site = web.SockSite(runner, sock)
        await site.start()
        self._sites[port] = site
        self._failed.pop(port, None)
        log.info("%s: health check node port %d serving", service, port)

    async def _runner_started(self) -> web.AppRunner:
        if self._runner is None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._answer)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            self._runner = runner
        return self._runner

    async def _answer(self, request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        check = self._checks.get(sockname[1]) if sockname else None
        if check is None:  # closed between accept and request
            return web.Response(status=503, text="no health check on this port\n")
        service, count = check
        healthy = self._healthy()
        return web.Response(
            status=200 if count > 0 and healthy else 503,
            text=health_check_body(service, count, healthy),
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff",
                     "X-Load-Balancing-Endpoint-Weight": str(count)},
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops every site
        self._runner = None
        self._sites.clear()
