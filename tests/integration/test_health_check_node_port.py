"""Health check node ports over real HTTP: the server alone, then a whole
uproxy in rules mode whose services file says which endpoints are on this
node and whether the node is being drained."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.integration.apphelpers import Backends, running_uproxy
from uproxy.healthchecks import HealthCheckServer
from uproxy.model import HealthCheck, ObjectName
from uproxy.rules.fake import FakeRules

WEB = ObjectName("shop", "web")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def probe(port: int, path: str = "/") -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, json.loads(await response.text()), dict(response.headers)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_the_server_answers_as_kube_proxy_does_and_follows_each_update() -> None:
    healthy = True
    server = HealthCheckServer(lambda: healthy, host="127.0.0.1")
    db = ObjectName("shop", "db")
    try:
        await server.update({WEB: HealthCheck(32000, 2)})
        port = server.bound[WEB][1]
        status, body, headers = await probe(port, "/any/path")
        assert status == 200
        assert body == {"service": {"namespace": "shop", "name": "web"},
                        "localEndpoints": 2, "serviceProxyHealthy": True}
        assert headers["Content-Type"].startswith("application/json")
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
        assert headers["X-Content-Type-Options"] == "nosniff"

        await server.update({WEB: HealthCheck(32000, 0)})  # no endpoint left on this node
        status, body, headers = await probe(port)
        assert (status, body["localEndpoints"], headers["X-Load-Balancing-Endpoint-Weight"]) \
            == (503, 0, "0")

        await server.update({WEB: HealthCheck(32000, 1)})
        healthy = False  # the proxy stopped syncing, or the node is draining
        status, body, _ = await probe(port)
        assert (status, body["serviceProxyHealthy"]) == (503, False)
        healthy = True

        # The written order: a new check listens at once; a gone one until retired.
        await server.update({db: HealthCheck(32001, 1)})
        assert set(server.bound) == {db}
        other = server.bound[db][1]
        assert (await probe(other))[1]["service"]["name"] == "db"
        assert not refused(port)
        await server.retire()
        assert refused(port)
    finally:
        await server.close()
    assert refused(other)


# --- a whole uproxy ---------------------------------------------------------------------


def objects(hc_port: int, node_port: int, backend: int, *, on_this_node: bool,
            draining: bool = False) -> list[dict[str, Any]]:
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"type": "LoadBalancer", "clusterIP": "198.18.1.10",
                        "externalTrafficPolicy": "Local", "healthCheckNodePort": hc_port,
                        "ports": [{"name": "http", "port": 80, "nodePort": node_port,
                                   "protocol": "TCP"}]}}
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": backend}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                       "nodeName": "node-1" if on_this_node else "node-2"}]}
    node: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}
    if draining:
        node["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                                    "effect": "NoSchedule"}]}
    return [service, endpoint_slice, node]


def write(path: Path, docs: list[dict[str, Any]]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump_all(docs))
    temporary.replace(path)


async def test_uproxy_serves_the_health_check_from_its_node_and_endpoints(
        tmp_path: Path, backends: Backends) -> None:
    backend = await backends.tcp("web")
    hc_port, node_port, healthz = free_port(), free_port(), free_port()
    services = tmp_path / "services.yaml"
    write(services, objects(hc_port, node_port, backend, on_this_node=True))
    rules = FakeRules()
    async with running_uproxy(services, "--bind-address", "127.0.0.1",
                              "--hostname-override", "node-1",
                              "--healthz-bind-address", f"127.0.0.1:{healthz}",
                              rules=rules) as up:
        server = up.parts.health_checks
        assert server is not None
        await up.wait_for(lambda: WEB in server.bound)
        listener = server.bound[WEB]
        # The rules reach the check's listener as a node port, like any other.
        (portal,) = [p for p in rules.portals if p.frontend.name.port == "healthCheckNodePort"]
        assert (portal.frontend.node_port, portal.frontend.addresses) == (hc_port, ())
        assert (portal.proxy_ip, portal.proxy_port) == listener
        served = listener[1]
        status, body, _ = await probe(served)
        assert (status, body["localEndpoints"]) == (200, 1)

        write(services, objects(hc_port, node_port, backend, on_this_node=False))
        await up.reload()
        status, body, _ = await probe(served)
        assert (status, body["localEndpoints"]) == (503, 0)

        write(services, objects(hc_port, node_port, backend, on_this_node=True, draining=True))
        await up.reload()
        status, body, _ = await probe(served)
        assert (status, body["localEndpoints"], body["serviceProxyHealthy"]) == (503, 1, False)
        status, body, _ = await probe(healthz, "/healthz")
        assert (status, body["reason"]) == (503, "this node is being deleted or drained")
        assert (await probe(healthz, "/livez"))[0] == 200  # no restart for draining

        write(services, objects(hc_port, node_port, backend, on_this_node=True)[1:])
        await up.reload()  # the service is gone: so are its health check and its rule
        assert refused(served)
        assert not [p for p in rules.portals if p.frontend.name.port == "healthCheckNodePort"]


async def test_a_laptop_serves_no_health_check(tmp_path: Path, backends: Backends) -> None:
    backend = await backends.tcp("web")
    hc_port = free_port()
    services = tmp_path / "services.yaml"
    write(services, objects(hc_port, free_port(), backend, on_this_node=True))
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16",
                              "--hostname-override", "node-1") as up:
        assert up.parts.health_checks is None
        assert up.parts.proxier.health_checks  # planned, but a laptop serves none
