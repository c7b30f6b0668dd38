"""End to end, laptop mode against a cluster: the `uproxy` command, pointed at
the test API server (run standalone, as `python tests/kubeapi.py --seed`),
gives each service a loopback IP with its real port and follows pod
changes, dropped watches and an API restart (410) — what a user of
`uproxy --master URL --bind-range 127.77.0.0/16` sees."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.integration.apphelpers import Backends, tcp_exchange
from tests.kubeapi import endpoint_slice, service

REPO = Path(__file__).resolve().parents[2]
TABLE_LINE = re.compile(
    r"^(\S+)\s+(\d+)/(tcp|udp)\s+->\s+(\S+):(\d+)\s+\((\d+) endpoints?\)$"
)


class Output:
    """Collects a child's stdout lines as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.lines: list[str] = []
        self.task = asyncio.create_task(self._collect(process))

    async def _collect(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def table(self) -> dict[str, tuple[str, int, int]]:
        """The latest row per service: (ip, port, endpoints)."""
        rows: dict[str, tuple[str, int, int]] = {}
        for line in self.lines:
            match = TABLE_LINE.match(line.strip())
            if match:
                rows[match[1]] = (match[4], int(match[5]), int(match[6]))
        return rows

    async def wait_line(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                match = re.search(pattern, line)
                if match:
                    return match
            await asyncio.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; got:\n" + "\n".join(self.lines))


@contextlib.asynccontextmanager
async def child(*argv: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, Output]]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO)
    output = Output(process)
    try:
        yield process, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        output.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await output.task



async def answer_from(address: tuple[str, int], tag: str, timeout: float = 8) -> None:
    """Connect until the reply comes from backend `tag` (pod changes take a sync)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await tcp_exchange(address, b"ping", timeout=2)
            if last == f"{tag}:ping".encode():
                return
        except OSError as error:
            last = error
        await asyncio.sleep(0.1)
    raise AssertionError(f"{address} never answered from {tag}; last: {last!r}")


async def test_uproxy_command_in_laptop_mode_follows_the_cluster(
    tmp_path: Path, backends: Backends
) -> None:
    pod_a = await backends.tcp("a")
    pod_b = await backends.tcp("b")
    cart_pod = await backends.tcp("cart")
    seed = tmp_path / "cluster.yaml"
    seed.write_text(yaml.safe_dump_all([
        service("default", "web", ports=[{"name": "http", "port": 8080, "targetPort": "http"}]),
        endpoint_slice("default", "web-1", "web", addresses=["127.0.0.1"],
                       ports=[{"name": "http", "port": pod_a}]),
        service("shop", "cart", ports=[{"name": "api", "port": 9000}], cluster_ip="10.96.0.9"),
        endpoint_slice("shop", "cart-1", "cart", addresses=["127.0.0.1"],
                       ports=[{"name": "api", "port": cart_pod}]),
        service("default", "skipped", ports=[{"port": 80}],
                labels={"service.kubernetes.io/service-proxy-name": "other"}),
    ]))
    async with child(sys.executable, "tests/kubeapi.py", "--port", "0", "--seed", str(seed),
                     "--bookmark-interval", "1") as (_, api_output):
        api_url = (await api_output.wait_line(r"kubeapi listening on (\S+)"))[1]
        async with child(sys.executable, "-m", "uproxy", "--master", api_url,
                         "--bind-range", "127.77.0.0/16", "--min-sync-period", "0s",
                         "--healthz-bind-address", "", "--metrics-bind-address", "") as (
                             uproxy, output), aiohttp.ClientSession() as http:
            await output.wait_line(r"default/web\s")
            await output.wait_line(r"shop/cart\s")
            table = output.table()
            assert "default/skipped" not in table
            web_ip, web_port, web_endpoints = table["default/web"]
            cart_ip, cart_port, _ = table["shop/cart"]
            assert (web_port, web_endpoints, cart_port) == (8080, 1, 9000)
            assert web_ip != cart_ip and web_ip.startswith("127.77.")
            assert await tcp_exchange((web_ip, 8080)) == b"a:ping"
            assert await tcp_exchange((cart_ip, 9000)) == b"cart:ping"

            # The pod restarts elsewhere: new connections follow.
            slices = f"{api_url}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
            moved = endpoint_slice("default", "web-1", "web", addresses=["127.0.0.1"],
                                   ports=[{"name": "http", "port": pod_b}])
            async with http.put(f"{slices}/web-1", json=moved) as response:
                assert response.status == 200
            await answer_from((web_ip, 8080), "b")

            # Watches dropped, then a new service: the resumed watch brings it.
            async with http.post(f"{api_url}/_test/drop") as response:
                assert (await response.json())["dropped"] >= 2
            services = f"{api_url}/api/v1/namespaces/default/services"
            async with http.post(services, json=service(
                    "default", "late", ports=[{"port": 7070}], cluster_ip="10.96.0.7")) as response:
                assert response.status == 201
            await output.wait_line(r"default/late\s+7070/tcp")

            # The API restarts with a new resourceVersion epoch: 410, relist,
            # and the services already served keep their IPs.
            async with http.post(f"{api_url}/_test/restart") as response:
                assert response.status == 200
            back = endpoint_slice("default", "web-1", "web", addresses=["127.0.0.1"],
                                  ports=[{"name": "http", "port": pod_a}])
            async with http.put(f"{slices}/web-1", json=back) as response:
                assert response.status == 200
            await answer_from((web_ip, 8080), "a")
            assert output.table()["default/web"][0] == web_ip
            assert await tcp_exchange((cart_ip, 9000)) == b"cart:ping"

            uproxy.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(uproxy.wait(), 15) == 0
        joined = "\n".join(output.lines)
        assert "Traceback" not in joined, joined
        assert re.search(r"expired \(410\); relisting", joined), joined
