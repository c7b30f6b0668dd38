"""Health check node ports through the whole `uproxy` command and real rules, on
a node whose INPUT policy drops: a load balancer (the client namespace) probes
NODE_IP:healthCheckNodePort and gets kube-proxy's answer; when this node has no
endpoint left, 503."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Netns, require_system
from tests.system.topology import NODE_IP, TAGGED_SERVERS, node_and_client, running_server

pytestmark = pytest.mark.system

HC_PORT, NODE_PORT = 32100, 30091

# The status and body of GET http://HOST:PORT/ ("error ..." when it cannot connect).
PROBE = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/healthz", timeout=2) as r:
        print(r.status, r.read().decode().replace(chr(10), ""))
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().replace(chr(10), ""))
except OSError as e:
    print("error", type(e).__name__)
"""


def objects(node: str) -> str:
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.18.1.30",
                 "externalTrafficPolicy": "Local", "healthCheckNodePort": HC_PORT,
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                            "nodePort": NODE_PORT, "protocol": "TCP"}]},
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                       "nodeName": node}],
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [service, endpoint_slice]})


@pytest.fixture
def topology() -> Iterator[tuple[Netns, Netns]]:
    require_system("iptables", "nft")
    with node_and_client("h") as (node, client), running_server(
        node, TAGGED_SERVERS, "127.0.0.1,8080,here",
    ):
        yield node, client


def probe_until(client: Netns, wanted: str, timeout: float = 10.0) -> str:
    """The probe's answer once it starts with `wanted` (uproxy starting or reloading);
    the last one on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.run(sys.executable, "-c", PROBE, NODE_IP, str(HC_PORT)).stdout.strip()
        if answer.startswith(wanted) or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


@pytest.mark.parametrize("rules", ["iptables", "nft"])
def test_a_load_balancer_probes_the_health_check_through_a_dropping_firewall(
    topology: tuple[Netns, Netns], tmp_path: Path, rules: str,
) -> None:
    node, client = topology
    if rules == "iptables":  # nft: an accept in our table cannot undo another table's drop
        node.run("iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate",
                 "ESTABLISHED,RELATED", "-j", "ACCEPT")
        node.run("iptables", "-P", "INPUT", "DROP")
    services = tmp_path / "services.json"
    services.write_text(objects("node-a"))
    log = tmp_path / f"uproxy-{uuid.uuid4().hex[:4]}.log"
    with open(log, "wb") as stderr:
        proxy = node.popen(
            sys.executable, "-m", "uproxy", "--services", str(services), "--rules", rules,
            "--hostname-override", "node-a", "--metrics-bind-address", "",
            "--healthz-bind-address", "127.0.0.1:0",
            "--min-sync-period", "0s", "--sync-period", "2s", "--shutdown-grace", "1s",
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        answer = probe_until(client, "200")
        status, body = answer.split(" ", 1)
        assert status == "200", log.read_text()
        assert json.loads(body) == {"service": {"namespace": "shop", "name": "web"},
                                    "localEndpoints": 1, "serviceProxyHealthy": True}

        services.write_text(objects("node-b"))  # the pod moved to another node
        answer = probe_until(client, "503")
        assert answer.startswith("503") and '"localEndpoints": 0' in answer, answer
        assert proxy.poll() is None, log.read_text()
    finally:
        proxy.kill()
        proxy.wait(5)
        node.run(sys.executable, "-m", "uproxy", "--cleanup", check=False)
