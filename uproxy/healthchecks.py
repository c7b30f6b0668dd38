"""Health check node ports: what a cloud load balancer probes on each node.

A LoadBalancer service with `externalTrafficPolicy: Local` gets a
`healthCheckNodePort` from the API server. Its load balancer sends traffic
only to nodes that answer 200 there, so that traffic is never sent to a node
without a local endpoint (where policy Local would drop it). As kube-proxy
does, every node answers, on that port and any path:

    200 (or 503) application/json
    X-Load-Balancing-Endpoint-Weight: N
    {"service": {"namespace": "ns", "name": "name"}, "localEndpoints": N,
     "serviceProxyHealthy": true}

200 when this node has ready endpoints of the service and the proxy is
healthy; 503 otherwise, and 503 while this node is being deleted or drained
(deletionTimestamp, or the cluster autoscaler's ToBeDeletedByClusterAutoscaler
taint), so the load balancer moves traffic away before the node goes.

The port is a node port like any other: each check gets a listener of its
own on a free port, and the proxier hands the rules a portal for it (port
name `healthCheckNodePort`), so the nat node-port rule REDIRECTs the probes
there and the filter rule that lets redirected traffic through a dropping
INPUT policy lets them through too; the node port itself is held by the
node-port reservations, as every node port is. One aiohttp runner serves
every listener (a site each). The proxier opens new listeners before the
rules, and retires gone ones after.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Mapping

from aiohttp import web

from uproxy.model import HealthCheck, ObjectName

log = logging.getLogger(__name__)

LISTEN_ADDRESS = "0.0.0.0"  # the node-port rules are IPv4 for a portal without addresses


def health_check_body(service: ObjectName, local_endpoints: int, healthy: bool) -> str:
    """The JSON kube-proxy answers with, field for field."""
    return json.dumps({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": healthy,
    }, indent=2)


def _listen(host: str) -> socket.socket:
    """A listening socket on a free port of `host`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HealthCheckServer:
    """A listener per health check, answering from the counts of the last update.

    `healthy()` is the proxy's own health (recent syncs) and this node not
    going away; it is asked at each request.
    """

    def __init__(self, healthy: Callable[[], bool], *, host: str = LISTEN_ADDRESS,
                 listen: Callable[[str], socket.socket] = _listen) -> None:
        self._healthy = healthy
        self._host = host
        self._listen = listen
        self._checks: dict[ObjectName, HealthCheck] = {}
        self._sites: dict[ObjectName, tuple[web.SockSite, tuple[str, int]]] = {}
        self._by_port: dict[int, ObjectName] = {}  # a listener's port -> whose it is
        self._runner: web.AppRunner | None = None

    @property
    def bound(self) -> Mapping[ObjectName, tuple[str, int]]:
        return {service: address for service, (_, address) in self._sites.items()
                if service in self._checks}

    async def update(self, checks: Mapping[ObjectName, HealthCheck]) -> None:
        self._checks = dict(checks)
        for service in sorted(checks):
            if service not in self._sites:
                await self._open(service)

    async def retire(self) -> None:
        for service in [s for s in self._sites if s not in self._checks]:
            site, (_, port) = self._sites.pop(service)
            self._by_port.pop(port, None)
            await site.stop()
            log.info("%s: health check listener closed", service)

    async def _open(self, service: ObjectName) -> None:
        runner = await self._runner_started()
        try:
            sock = self._listen(self._host)
        except OSError as error:  # out of descriptors: the next sync tries again
            log.warning("%s: no health check listener: %s", service, error)
            return
        address = sock.getsockname()
        site = web.SockSite(runner, sock)
        await site.start()
        self._sites[service] = (site, (str(address[0]), int(address[1])))
        self._by_port[int(address[1])] = service
        log.info("%s: health check node port %d served on %s:%d", service,
                 self._checks[service].node_port, address[0], address[1])

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
        service = self._by_port.get(sockname[1]) if sockname else None
        check = self._checks.get(service) if service is not None else None
        if service is None or check is None:  # retired between accept and request
            return web.Response(status=503, text="no health check here\n")
        count = check.local_endpoints
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
        self._by_port.clear()
