"""The /status page in a real browser: headless Chromium loads it from the real
metrics server while connections keep arriving, and the rendered DOM shows
every service port with its endpoints and picks. A screenshot is kept in the
test's output folder.

Needs Debian's `chromium`; skipped without it, failed under
UPROXY_REQUIRE_SYSTEM=1 (CI installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SYSTEM
from tests.integration.apphelpers import Backends, running_uproxy, tcp_exchange, write_services
from tests.unit.test_status import DNS, WEB, Clock, FakeProxier, FakeRunner, FakeTracker
from uproxy.web import WebServer, WebState, start_web

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--hide-scrollbars", "--window-size=1280,1300",
)


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if REQUIRE_SYSTEM:
            pytest.fail("UPROXY_REQUIRE_SYSTEM=1 but chromium is not installed")
        pytest.skip("needs Debian's chromium package")
    return CHROMIUM


class StatusDom(HTMLParser):
    """What the page rendered: ports (data-id) and their endpoint rows."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.ports: dict[str, dict[str, str | None]] = {}
        self.picks: dict[str, dict[str, int]] = {}
        self._port: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        elif tag == "section" and found.get("data-id"):
            self._port = str(found["data-id"])
            self.ports[self._port] = found
            self.picks[self._port] = {}
        elif tag == "tr" and self._port and found.get("data-address"):
            self.picks[self._port][str(found["data-address"])] = int(found["data-picks"] or 0)


async def run_chromium(binary: str, profile: Path, *args: str) -> str:
    """One headless run against the live server (which keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"chromium exited {proc.returncode}"
    return out.decode()


@pytest.fixture
def proxier() -> FakeProxier:
    proxier = FakeProxier(clock=Clock())
    proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080"])
    proxier.serve(DNS, 53, [], cluster_ip="198.18.0.53", listener=("0.0.0.0", 30053))
    return proxier


@pytest.fixture
async def server(proxier: FakeProxier) -> AsyncIterator[WebServer]:
    runner = FakeRunner(last_success=0.0, syncs=1)
    state = WebState(proxier, runner, FakeTracker({"file"}), {"file"}, 30.0,
                     monotonic=lambda: 1.0)
    web = await start_web(("127.0.0.1", 0), "metrics", state)
    assert web is not None
    yield web
    await web.close()


async def traffic(proxier: FakeProxier, stop: asyncio.Event) -> None:
    """Connections keep arriving, as a curl loop would make them."""
    stats = proxier.stats[WEB]
    for _ in range(2000):  # bounded: 2000 x 10 ms
        if stop.is_set():
            return
        proxier.connect(WEB)
        stats.bytes_in += 78
        stats.bytes_out += 615
        stats.connections_active -= 1
        await asyncio.sleep(0.01)


async def test_status_page_renders_ports_and_follows_traffic(
    chromium: str, proxier: FakeProxier, server: WebServer, tmp_path: Path, output_dir: Path
) -> None:
    for _ in range(3):
        proxier.connect(WEB)

    first = StatusDom(await run_chromium(
        chromium, tmp_path / "profile", "--virtual-time-budget=2500", "--dump-dom",
        server.url + "/status"))
    assert int(first.body.get("data-refreshes") or 0) >= 1, "the page never loaded status.json"
    assert set(first.ports) == {"default/web:http", "kube-system/dns:dns"}
    assert first.ports["default/web:http"]["data-endpoints"] == "2"
    assert first.ports["kube-system/dns:dns"]["data-endpoints"] == "0"
    assert first.picks["default/web:http"] == {"127.0.0.1:8080": 2, "127.0.0.2:8080": 1}

    # A third endpoint arrives and traffic flows while the browser watches.
    proxier.serve(WEB, 80, ["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.3:8080"])
    start_picks = sum(proxier.stats[WEB].picks.values())
    stop = asyncio.Event()
    flowing = asyncio.create_task(traffic(proxier, stop))
    try:
        await asyncio.sleep(0.2)
        html = await run_chromium(
            chromium, tmp_path / "profile", "--virtual-time-budget=4000", "--dump-dom",
            server.url + "/status")
        await run_chromium(
            chromium, tmp_path / "profile", "--virtual-time-budget=2500",
            f"--screenshot={output_dir / 'status.png'}", server.url + "/status")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await flowing
    end_picks = sum(proxier.stats[WEB].picks.values())

    during = StatusDom(html)
    assert int(during.body.get("data-refreshes") or 0) >= 2, "the page did not refresh itself"
    assert during.ports["default/web:http"]["data-endpoints"] == "3"
    rendered = during.picks["default/web:http"]
    assert set(rendered) == {"127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.3:8080"}
    assert start_picks < sum(rendered.values()) <= end_picks
    assert int(during.ports["default/web:http"]["data-accepted"] or 0) > 3
    assert "REDIRECT --to-ports 30001" in html
    assert "no endpoints: datagrams are dropped" in html

    screenshot = (output_dir / "status.png").read_bytes()
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 20_000


DOCS_SCREENSHOT = Path(__file__).parent.parent.parent / "docs" / "images" / "status-page.png"


async def test_the_tutorials_screenshot_is_of_a_real_uproxy(
    chromium: str, tmp_path: Path, output_dir: Path, backends: Backends,
) -> None:
    """docs/tutorial.md shows the status page of a real uproxy in laptop mode: three
    nginx-like pods behind one service, DNS with no pod, after a few requests.
    UPROXY_UPDATE_DOCS=1 copies the screenshot into docs/images/."""
    pods = [await backends.tcp(f"nginx-{n}") for n in range(3)]
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": "nginx-service", "ports": [{"port": 80}],
         "endpoints": [f"127.0.0.1:{port}" for port in pods]},
        {"name": "kube-dns", "namespace": "kube-system",
         "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}], "endpoints": []},
    ])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16",
                              "--metrics-bind-address", "127.0.0.1:0") as up:
        nginx = up.address("default/nginx-service")
        for _ in range(7):
            await tcp_exchange(nginx, b"GET / HTTP/1.0\r\n\r\n")
        status_url = up.parts.web_servers[-1].url + "/status"
        dom = StatusDom(await run_chromium(chromium, tmp_path / "profile",
                                           "--virtual-time-budget=2500", "--dump-dom",
                                           status_url))
        await run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=2500",
                           f"--screenshot={output_dir / 'status-page.png'}", status_url)
    assert set(dom.ports) == {"default/nginx-service", "kube-system/kube-dns:dns"}
    assert dom.ports["default/nginx-service"]["data-endpoints"] == "3"
    assert sum(dom.picks["default/nginx-service"].values()) == 7
    screenshot = (output_dir / "status-page.png").read_bytes()
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 20_000
    if os.environ.get("UPROXY_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        DOCS_SCREENSHOT.write_bytes(screenshot)
