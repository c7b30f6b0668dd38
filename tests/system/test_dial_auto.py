"""`--dial auto`, the laptop-mode default with the Kubernetes source, decides
per pod network with a real probe: inside a namespace made for the test, one
service's pods are on loopback (they answer: dialled directly), another's
are in 198.18.60.0/24, which has an `unreachable` route there (no answer:
reached through the API server's port-forward). The test API server, the
pods and uproxy all run in that namespace; nothing leaves it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import Netns
from tests.integration.apphelpers import Lines
from tests.kubeapi import endpoint_slice, pod, pod_endpoint, service

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PORT = 7500

PODS = """
import socket, sys, threading
def serve(host, tag):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(sys.argv[1]))); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(tag.encode() + b":" + c.recv(100)); c.close()
for spec in sys.argv[2:]:
    host, tag = spec.split(",")
    threading.Thread(target=serve, args=(host, tag), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = """
import json, socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(b"hi"); print(s.recv(100).decode())
"""

GET = """
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], method=sys.argv[2])
print(urllib.request.urlopen(request).read().decode())
"""


def wait_line(lines: Lines, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines.lines):
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line with {text!r} in {lines.lines[-20:]}")


def test_auto_dials_answering_pods_directly_and_the_others_through_port_forward(
    netns: Netns, tmp_path: Path
) -> None:
    netns.run("ip", "route", "add", "unreachable", "198.18.60.0/24")
    seed = tmp_path / "cluster.yaml"
    seed.write_text(yaml.safe_dump_all([
        pod("default", "near-1", "127.0.3.1"), pod("default", "far-1", "198.18.60.1"),
        service("default", "near", ports=[{"name": "p", "port": 80}]),
        endpoint_slice("default", "near-x", "near", ports=[{"name": "p", "port": PORT}],
                       endpoints=[pod_endpoint("default", "near-1", "127.0.3.1")]),
        service("default", "far", ports=[{"name": "p", "port": 80}], cluster_ip="10.96.0.2"),
        endpoint_slice("default", "far-x", "far", ports=[{"name": "p", "port": PORT}],
                       endpoints=[pod_endpoint("default", "far-1", "198.18.60.1")]),
    ]))
    processes: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> Lines:
        process = netns.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT)
        processes.append(process)
        return Lines(process)

    try:
        pods = start(sys.executable, "-c", PODS, str(PORT), "127.0.3.1,near", "127.0.4.1,far")
        wait_line(pods, "ready")
        api = start(sys.executable, "tests/kubeapi.py", "--port", "0", "--seed", str(seed))
        url = wait_line(api, "kubeapi listening on").split()[-1]
        netns.run(sys.executable, "-c", GET,
                  f"{url}/_test/portforward-target?pod=default/far-1&host=127.0.4.1", "POST")
        up = start(sys.executable, "-m", "uproxy", "--master", url, "--bind-range",
                   "127.77.0.0/16", "--healthz-bind-address", "", "--metrics-bind-address", "",
                   "--min-sync-period", "0s")
        table = up.table(2, timeout=30)
        near_ip, far_ip = table["default/near"][0], table["default/far"][0]
        wait_line(up, "127.0.0.0/16 answer from here")
        wait_line(up, "198.18.0.0/16 do not answer from here")

        assert netns.run(sys.executable, "-c", CLIENT, near_ip, "80").stdout.strip() == "near:hi"
        assert netns.run(sys.executable, "-c", CLIENT, far_ip, "80").stdout.strip() == "far:hi"
        sessions = json.loads(netns.run(sys.executable, "-c", GET,
                                        f"{url}/_test/portforward-sessions", "POST").stdout)
        assert [s[0] for s in sessions] == ["default/far-1"]  # near-1 was dialled directly
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
