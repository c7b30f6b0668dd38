"""PROXY protocol in rules mode, through real nat rules in namespaces: the
endpoint's header names the client's own address (another host, over
PREROUTING) and the service IP and port it dialled (SO_ORIGINAL_DST), not the
proxy port the rules sent it to."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_system
from tests.integration.apphelpers import Lines
from tests.system.topology import CLIENT_IP, node_and_client, running_server
from uproxy.proxyheader import proxy_header

pytestmark = pytest.mark.system

VIP = "198.18.1.10"

CAPTURE = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 18090)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"!"):
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.sendall(data); c.close()
"""

CLIENT = """
import json, socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        s = socket.create_connection((sys.argv[1], 80), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
source = s.getsockname()[:2]
s.sendall(b"hello!")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(json.dumps({"source": source, "got": data.hex()}))
"""


@pytest.mark.parametrize("rules", ["iptables", "nft"])
@pytest.mark.parametrize("version", [1, 2])
def test_the_header_names_the_client_and_the_service_ip(
    tmp_path: Path, rules: str, version: int
) -> None:
    require_system("iptables", "nft")
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"services": [{
        "name": "web", "clusterIP": VIP, "proxyProtocol": f"v{version}",
        "ports": [{"port": 80, "targetPort": 18090}], "endpoints": ["127.0.0.1"]}]}))
    with node_and_client("pp") as (node, client), running_server(node, CAPTURE):
        up = node.popen(sys.executable, "-m", "uproxy", "--services", str(services),
                        "--rules", rules, "--healthz-bind-address", "",
                        "--metrics-bind-address", "", stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
        try:
            Lines(up).table(1, timeout=20)
            result = json.loads(client.run(sys.executable, "-c", CLIENT, VIP).stdout)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(20)
    source = (result["source"][0], result["source"][1])
    assert source[0] == CLIENT_IP
    assert bytes.fromhex(result["got"]) == proxy_header(version, source, (VIP, 80)) + b"hello!"
