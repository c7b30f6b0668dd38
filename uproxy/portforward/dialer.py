"""Opening a port-forward to one pod port: one WebSocket through the API server.

The request is `GET /api/v1/namespaces/NS/pods/NAME/portforward?ports=PORT`,
upgraded to a WebSocket speaking `v5.channel.k8s.io` (or `v4`). It goes out
on kubernetes-asyncio's own client session, so it has the kubeconfig's TLS
setup (CA, client certificate), and carries the same credentials the watch
uses (a bearer token, refreshed by an exec plugin when it expires): no
second authentication path. One WebSocket per TCP connection, so one pod's
failure never takes another connection with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from uproxy.portforward.channels import (
    PROTOCOLS,
    V5,
    ChannelDecoder,
    Event,
    Failure,
    PortAck,
    ProtocolError,
    close_message,
    data_message,
)

# The WebSocket's read limit per message; the kubelet sends at most 32 KiB.
MAX_MESSAGE = 4 * 1024 * 1024
RBAC_HINT = "RBAC permission pods/portforward, verbs get and create"


class PortForwardError(Exception):
    """A port-forward that could not be opened; `str()` is one line.

    `pod_level` is False when no pod could be reached this way (the API
    server is unreachable or refuses port-forward): another pod fares no better.
    """

    def __init__(self, message: str, *, pod_level: bool = True) -> None:
        super().__init__(message)
        self.pod_level = pod_level


def portforward_url(host: str, pod: str, port: int) -> str:
    """The WebSocket URL of a pod port's port-forward (`pod` is namespace/name)."""
    namespace, _, name = pod.partition("/")
    parts = urlsplit(host.rstrip("/"))
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = (f"{parts.path}/api/v1/namespaces/{quote(namespace, safe='')}"
            f"/pods/{quote(name, safe='')}/portforward")
    return urlunsplit((scheme, parts.netloc, path, f"ports={port}", ""))


class Stream:
    """One open port-forward: bytes to and from one pod port."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, decoder: ChannelDecoder,
                 early: list[Event]) -> None:
        self._ws = ws
        self._decoder = decoder
        self._early = early  # events that came with the port acknowledgements
        self.protocol = ws.protocol or "v4.channel.k8s.io"

    @property
    def half_close(self) -> bool:
        """Whether a half-close can be passed on (v5's close signal; v4 has none)."""
        return self.protocol == V5

    async def send(self, data: bytes) -> None:
        """Send to the pod; waits while the WebSocket's buffer is full."""
        await self._ws.send_bytes(data_message(data))

    async def close_write(self) -> bool:
        """Tell the pod we have nothing more to send; False when v4 cannot."""
        if not self.half_close:
            return False
        await self._ws.send_bytes(close_message())
        return True

    async def receive(self, timeout: float | None = None) -> list[Event] | None:
        """The next events from the pod; None when the stream has ended.

        Raises TimeoutError after `timeout`, ProtocolError on a bad message,
        ConnectionResetError when the WebSocket broke instead of closing.
        """
        if self._early:
            early, self._early = self._early, []
            return early
        message = await asyncio.wait_for(self._ws.receive(), timeout)
        if message.type == aiohttp.WSMsgType.BINARY:
            return self._decoder.feed(message.data)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED):
            if self._ws.close_code not in (None, 1000):
                raise ConnectionResetError(f"the stream closed with code {self._ws.close_code}")
            return None
        if message.type == aiohttp.WSMsgType.ERROR:
            raise ConnectionResetError(f"the stream broke: {self._ws.exception()}")
        raise ProtocolError(f"a {message.type.name} message (the protocol is binary)")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()


class Dialer:
    """Opens port-forwards with the Kubernetes client configuration uproxy loaded.

    `configuration` gives it once the source has loaded it (at start, before
    anything listens); the client session is made on the first dial.
    """

    def __init__(self, configuration: Callable[[], Any]) -> None:
        self._get_configuration = configuration
        self._client: Any = None
        self.streams = 0  # open now, for uproxy_portforward_streams

    def _api_client(self) -> Any:
        if self._client is None:
            from kubernetes_asyncio.client import ApiClient

            self._client = ApiClient(self._get_configuration())
        return self._client

    async def open(self, pod: str, port: int, timeout: float) -> Stream:
        """The stream once both channels named the port. Raises PortForwardError
        (handshake refused, API server unreachable, the kubelet's error)."""
        try:
            return await asyncio.wait_for(self._open(pod, port), timeout)
        except TimeoutError:
            raise PortForwardError(f"pod {pod}: no port-forward within {timeout:g}s") from None

    async def _open(self, pod: str, port: int) -> Stream:
        client = self._api_client()
        headers: dict[str, str] = {}
        await client.update_params_for_auth(headers, [], ["BearerToken"])
        rest = client.rest_client
        host = client.configuration.host
        url = portforward_url(host, pod, port)
        try:
            ws = await rest.pool_manager.ws_connect(
                url, protocols=PROTOCOLS, headers=headers, max_msg_size=MAX_MESSAGE,
                server_hostname=rest.server_hostname, proxy=rest.proxy,
                proxy_headers=rest.proxy_headers, autoclose=False,
            )
        except aiohttp.WSServerHandshakeError as error:
            raise _handshake_error(pod, error.status, error.message) from None
        except (aiohttp.ClientError, OSError) as error:
            raise PortForwardError(f"the API server {host} cannot be "
                                   f"reached for port-forward: {error}", pod_level=False) from None
        decoder = ChannelDecoder(port)
        early: list[Event] = []
        try:
            while not decoder.ready:
                message = await ws.receive()
                if message.type != aiohttp.WSMsgType.BINARY:
                    raise PortForwardError(f"pod {pod}: the stream ended before it named the "
                                           "port")
                for event in decoder.feed(message.data):
                    if isinstance(event, Failure):
                        raise PortForwardError(f"pod {pod}: {event.text}")
                    early.append(event)
        except ProtocolError as error:
            await ws.close()
            raise PortForwardError(f"pod {pod}: {error}") from None
        except BaseException:
            await ws.close()
            raise
        early = [e for e in early if not isinstance(e, PortAck)]
        return Stream(ws, decoder, early)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _handshake_error(pod: str, status: int, message: str) -> PortForwardError:
    if status == 403:
        return PortForwardError(f"the API server refuses port-forward to pod {pod} (403 "
                                f"Forbidden): needs the {RBAC_HINT}", pod_level=False)
    if status == 401:
        return PortForwardError("the API server does not accept the kubeconfig's credentials "
                                "for port-forward (401 Unauthorized)", pod_level=False)
    if status == 404:
        return PortForwardError(f"pod {pod}: not found (404)")
    return PortForwardError(f"pod {pod}: port-forward refused: {status} {message}".strip())
