"""End to end: the `uproxy --kubeconfig K --context C --bind-range ... --dial
portforward` command against the test API server, with pod IPs nothing listens
on. The kubeconfig's token reaches the port-forward; a reader that stalls
while a pod floods it leaves uproxy's memory bounded; /status and /metrics
say what is dialled how; SIGTERM ends it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.integration.test_kube_source_e2e import Output
from tests.kubeapi import FakeKubeAPI, endpoint_slice, pod, pod_endpoint, service
from tests.reliability.conftest import rss_bytes

MiB = 1024 * 1024
FLOOD = 64 * MiB


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI(bookmark_interval=1.0)
    await server.start()
    yield server
    await server.stop()


EXEC_CREDENTIAL = ('{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", '
                   '"status": {"token": "s3cret"}}')


def kubeconfig(path: Path, url: str, user: str) -> Path:
    """Two contexts: the current one points nowhere, `test` at the test server.
    `user`: a static token, or an exec credential plugin that prints it."""
    credentials: dict[str, object] = {"token": "s3cret"} if user == "token" else {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/sh",
        "args": ["-c", f"echo '{EXEC_CREDENTIAL}'"], "interactiveMode": "Never"}}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
        "clusters": [{"name": "test", "cluster": {"server": url}},
                     {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "dev", "user": credentials}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "dev"}},
                     {"name": "elsewhere", "context": {"cluster": "nowhere", "user": "dev"}}],
    }))
    return path


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"pod:" + data)


class Flood(asyncio.Protocol):
    """Writes FLOOD bytes as fast as the connection takes them; counts what left."""

    sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=64 * 1024)
        self.paused = False
        self.fill()

    def fill(self) -> None:
        while not self.paused and Flood.sent < FLOOD:
            self.transport.write(b"z" * 65536)
            Flood.sent += 65536

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.fill()


@contextlib.asynccontextmanager
async def uproxy(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, Output]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uproxy", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output = Output(process)
    try:
        yield process, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        output.task.cancel()


@pytest.mark.parametrize("user", ["token", "exec plugin"])
async def test_the_command_reaches_pods_through_port_forward_with_the_kubeconfigs_token(
    api: FakeKubeAPI, tmp_path: Path, user: str
) -> None:
    Flood.sent = 0
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Echo, "127.0.2.1", 7400),
               await loop.create_server(Flood, "127.0.2.2", 7400)]
    for name, target in (("web-1", "127.0.2.1"), ("flood-1", "127.0.2.2")):
        pod_ip = "127.0.1.1" if name == "web-1" else "127.0.1.2"  # nothing listens there
        api.create(pod("default", name, pod_ip))
        api.kubelet.targets[f"default/{name}"] = target
        svc = name.split("-")[0]
        api.create(service("default", svc, ports=[{"name": "p", "port": 80}]))
        api.create(endpoint_slice("default", f"{svc}-x", svc, ports=[{"name": "p", "port": 7400}],
                                  endpoints=[pod_endpoint("default", name, pod_ip)]))
    api.kubelet.token = "s3cret"
    config = kubeconfig(tmp_path / "kubeconfig", api.url, user)
    try:
        async with uproxy("--kubeconfig", str(config), "--context", "test",
                          "--bind-range", "127.77.0.0/16", "--dial", "portforward",
                          "--healthz-bind-address", "", "--metrics-bind-address", "127.0.0.1:0",
                          "--shutdown-grace", "1s") as (process, output), \
                aiohttp.ClientSession() as http:
            metrics = (await output.wait_line(r"metrics listening on (\S+)", 20))[1]
            await output.wait_line(r"default/flood\s", 20)
            table = output.table()
            web = (table["default/web"][0], 80)
            reader, writer = await asyncio.open_connection(*web)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(100), 10) == b"pod:hello"
            assert ("default/web-1", 7400, "v5.channel.k8s.io") in api.kubelet.sessions

            status = await (await http.get(f"{metrics}/status.json")).json()
            endpoints = {e["pod"]: e["dial"] for s in status["services"]
                         for p in s["ports"] for e in p["endpoints"]}
            assert endpoints == {"default/web-1": "portforward",
                                 "default/flood-1": "portforward"}
            text = await (await http.get(f"{metrics}/metrics")).text()
            assert "uproxy_portforward_streams 1.0" in text
            writer.close()

            # A client that reads nothing while its pod floods it.
            baseline = rss_bytes(process.pid)
            flood = socket.create_connection((table["default/flood"][0], 80))
            flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            peak = baseline
            before, deadline = -1, time.monotonic() + 30
            while Flood.sent != before and time.monotonic() < deadline:
                before = Flood.sent
                await asyncio.sleep(0.5)
                peak = max(peak, rss_bytes(process.pid))
            growth = peak - baseline
            print(f"stalled reader through port-forward: {Flood.sent / MiB:.1f} MiB left the "
                  f"pod, uproxy RSS +{growth / MiB:.1f} MiB")
            assert Flood.sent < FLOOD  # the pod is held back
            assert growth < 16 * MiB, f"uproxy grew {growth / MiB:.1f} MiB"
            flood.close()

            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0
        joined = "\n".join(output.lines)
        assert "Traceback" not in joined and "ERROR" not in joined, joined
    finally:
        for server in servers:
            server.close()
    json.dumps(status)  # the status document is JSON all the way down
