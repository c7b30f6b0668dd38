"""The test API server's port-forward, checked against an independent client:
the official `kubernetes` Python client's `kubernetes.stream.portforward`
(as the list+watch side is checked against kubernetes-asyncio). If this
client and uproxy's dialer both work with it, the server speaks the protocol
as the kubelet does, not as uproxy happens to expect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import kubernetes
import pytest
from kubernetes.stream import portforward

from tests.integration.apphelpers import Backends
from tests.kubeapi import FakeKubeAPI, pod


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    await server.start()
    yield server
    await server.stop()



def _core(url: str) -> kubernetes.client.CoreV1Api:
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


def _exchange(url: str, name: str, port: int, payload: bytes) -> tuple[bytes, str | None]:
    """Through the official client: send, read the answer, and the error channel."""
    core = _core(url)
    forward = portforward(core.connect_get_namespaced_pod_portforward, name, "default",
                          ports=str(port))
    sock = forward.socket(port)
    sock.settimeout(5)
    answer = b""
    try:
        if payload:
            sock.sendall(payload)
        while len(answer) < len(payload) + 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    finally:
        sock.close()
    error = forward.error(port)
    forward.close()
    return answer, error


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
async def test_the_official_client_reaches_a_pod_through_the_test_server(
    api: FakeKubeAPI, backends: Backends, protocol: str
) -> None:
    api.kubelet.protocols = (protocol,)
    port = await backends.tcp("web-1", host="127.0.0.5")
    api.create(pod("default", "web-1", "198.18.50.1"))
    api.kubelet.targets["default/web-1"] = "127.0.0.5"

    answer, error = await asyncio.to_thread(_exchange, api.url, "web-1", port, b"hello")

    assert (answer, error) == (b"web-1:hello", None)
    assert api.kubelet.sessions == [("default/web-1", port, protocol)]


async def test_the_official_client_reads_the_kubelets_error_when_the_pod_refuses(
    api: FakeKubeAPI
) -> None:
    api.create(pod("default", "down", "198.18.50.2"))
    api.kubelet.targets["default/down"] = "127.0.0.5"  # nothing listens on the port

    answer, error = await asyncio.to_thread(_exchange, api.url, "down", 1, b"")

    assert answer == b""
    assert error is not None and "error forwarding port 1 to pod down" in error
    assert "connection refused" in error.lower()


async def test_a_missing_pod_is_404_and_forbidden_is_403_for_the_official_client(
    api: FakeKubeAPI
) -> None:
    def status_of(name: str) -> str:
        try:
            _exchange(api.url, name, 80, b"x")
        except kubernetes.client.exceptions.ApiException as error:
            # This client reports a refused handshake as status 0, the HTTP status in its reason.
            return str(error.reason)
        return "opened"

    assert "Handshake status 404 Not Found" in await asyncio.to_thread(status_of, "nobody")
    api.create(pod("default", "web-1", "198.18.50.1"))
    api.kubelet.forbidden = True
    assert "Handshake status 403 Forbidden" in await asyncio.to_thread(status_of, "web-1")
