"""externalTrafficPolicy: Local through the whole `uproxy` command, with real rules.

Timeline: a "node" namespace runs `uproxy --hostname-override node-a` over a
services file in Kubernetes' own form (an EndpointSlice names each
endpoint's nodeName) and two tagged TCP servers, 127.0.0.1:8080 ("here",
nodeName node-a) and 127.0.0.2:8080 ("elsewhere", nodeName node-b). The
service is a NodePort with an external IP and externalTrafficPolicy: Local.

- Through the cluster IP (nat OUTPUT on the node, PREROUTING from the client
  namespace) connections go round-robin to both endpoints.
- Through the node port and the external IP, from the client namespace,
  they all reach the endpoint on this node.
- With no endpoint on this node (the file changes), node-port and
  external-IP connections are reset, and the cluster IP still serves.

A UDP port of the same service follows the same policy: each new session's
original destination is looked up in the connection tracker.

Variants: `--rules iptables` and `--rules nft`, and `--workers 2` (the
external endpoints travel to worker processes). Also: the original
destination the relay asks the kernel for, of an IPv4 client of a dual-stack
listener and of an IPv6 client, through real REDIRECT rules.
"""

from __future__ import annotations

import json
import socket
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

VIP, EXTERNAL_IP, NODE_PORT, UDP_NODE_PORT = "198.18.1.20", "198.18.2.20", 30081, 30082
HERE, ELSEWHERE = "node-a", "node-b"

# One line per attempt: the tag the endpoint sent, or the error's type.
CLIENT = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            print(s.recv(100).decode() or "error EOF")
    except OSError as e:
        print("error", type(e).__name__)
"""

# The same over UDP: a new socket (a new session) per attempt.
UDP_CLIENT = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        try:
            s.sendto(b"x", (host, port))
            print(s.recv(100).decode().split(":")[0])
        except OSError as e:
            print("error", type(e).__name__)
"""


def objects(endpoints: list[tuple[str, str]]) -> str:
    """The service and its slice as `kubectl get -o json` prints them."""
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "NodePort", "clusterIP": VIP, "clusterIPs": [VIP],
            "externalIPs": [EXTERNAL_IP], "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                       "nodePort": NODE_PORT},
                      {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP",
                       "nodePort": UDP_NODE_PORT}],
        },
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 8080, "protocol": "UDP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
                      for ip, node in endpoints],
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [service, endpoint_slice]})


BOTH = [("127.0.0.1", HERE), ("127.0.0.2", ELSEWHERE)]
ONLY_ELSEWHERE = [("127.0.0.2", ELSEWHERE)]


@pytest.fixture
def topology() -> Iterator[tuple[Netns, Netns]]:
    require_system("iptables", "nft")
    with node_and_client("x") as (node, client), running_server(
        node, TAGGED_SERVERS, "127.0.0.1,8080,here", "127.0.0.2,8080,elsewhere",
    ):
        yield node, client


def replies(ns: Netns, host: str, port: int, count: int, *, udp: bool = False) -> list[str]:
    out = ns.run(sys.executable, "-c", UDP_CLIENT if udp else CLIENT, host, str(port),
                 str(count)).stdout
    return out.splitlines()


def eventually_replies(ns: Netns, host: str, port: int, wanted: set[str],
                       timeout: float = 10.0) -> list[str]:
    """Replies of 4 connections once they are exactly `wanted` (uproxy starting or
    reloading); the last ones seen on timeout."""
    deadline = time.monotonic() + timeout
    got = replies(ns, host, port, 4)
    while {r.split()[0] for r in got} != wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        got = replies(ns, host, port, 4)
    return got


@pytest.mark.parametrize(("rules", "workers"), [("iptables", 1), ("nft", 1), ("iptables", 2)],
                         ids=["iptables", "nft", "iptables-2-workers"])
def test_external_traffic_reaches_only_this_nodes_endpoints(
    topology: tuple[Netns, Netns], tmp_path: Path, rules: str, workers: int,
) -> None:
    node, client = topology
    services = tmp_path / "services.json"
    services.write_text(objects(BOTH))
    log = tmp_path / f"uproxy-{uuid.uuid4().hex[:4]}.log"
    with open(log, "wb") as stderr:
        proxy = node.popen(
            sys.executable, "-m", "uproxy", "--services", str(services), "--rules", rules,
            "--hostname-override", HERE, "--workers", str(workers),
            "--healthz-bind-address", "", "--metrics-bind-address", "",
            "--min-sync-period", "0s", "--sync-period", "2s", "--shutdown-grace", "1s",
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # Cluster IP, from the node itself and from the client: every endpoint, in turn.
        from_node = eventually_replies(node, VIP, 80, {"here", "elsewhere"})
        assert sorted(from_node) == ["elsewhere", "elsewhere", "here", "here"], log.read_text()
        assert sorted(replies(client, VIP, 80, 4)) == ["elsewhere", "elsewhere", "here", "here"]
        # Node port and external IP, from outside: only the endpoint on this node.
        assert replies(client, NODE_IP, NODE_PORT, 6) == ["here"] * 6
        assert replies(client, EXTERNAL_IP, 80, 6) == ["here"] * 6
        # Cluster traffic kept its own round-robin turn meanwhile.
        assert sorted(replies(client, VIP, 80, 2)) == ["elsewhere", "here"]
        # UDP likewise: each new session's original destination comes from conntrack.
        assert sorted(replies(client, VIP, 53, 4, udp=True)) == ["elsewhere", "elsewhere",
                                                                  "here", "here"]
        assert replies(client, NODE_IP, UDP_NODE_PORT, 6, udp=True) == ["here"] * 6
        assert replies(client, EXTERNAL_IP, 53, 6, udp=True) == ["here"] * 6
        assert sorted(replies(node, VIP, 53, 2, udp=True)) == ["elsewhere", "here"]

        # No endpoint on this node: external connections are reset, the cluster IP serves.
        services.write_text(objects(ONLY_ELSEWHERE))
        assert eventually_replies(client, VIP, 80, {"elsewhere"}) == ["elsewhere"] * 4
        refused = replies(client, NODE_IP, NODE_PORT, 3) + replies(client, EXTERNAL_IP, 80, 3)
        assert all(r.startswith("error") for r in refused), refused
        dropped = replies(client, NODE_IP, UDP_NODE_PORT, 2, udp=True)
        assert dropped == ["error TimeoutError"] * 2, dropped
        assert replies(client, VIP, 53, 2, udp=True) == ["elsewhere"] * 2
        assert replies(node, VIP, 80, 2) == ["elsewhere"] * 2

        # The endpoint comes back: external traffic is served again.
        services.write_text(objects(BOTH))
        assert eventually_replies(client, NODE_IP, NODE_PORT, {"here"}) == ["here"] * 4
        assert proxy.poll() is None, log.read_text()
    finally:
        proxy.kill()
        proxy.wait(5)
        node.run(sys.executable, "-m", "uproxy", "--cleanup", check=False)


# In a namespace: a dual-stack listener on [::]:P, nat OUTPUT REDIRECTs from an
# IPv4 and an IPv6 address's port 80 to it; prints what original_destination
# says for each accepted connection, and for one that came straight to P.
ORIGINAL = """
import json, socket, subprocess, sys
from uproxy.relay.tcp import original_destination
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", 0)); listener.listen(8)
port = listener.getsockname()[1]
for tool, vip in (("iptables", "198.18.2.30"), ("ip6tables", "fd00:198:18:2::30")):
    subprocess.run([tool, "-t", "nat", "-A", "OUTPUT", "-d", vip, "-p", "tcp", "--dport", "80",
                    "-j", "REDIRECT", "--to-ports", str(port)], check=True)
result = {"port": port}
for label, address in (("v4", ("198.18.2.30", 80)), ("v6", ("fd00:198:18:2::30", 80)),
                       ("direct", ("127.0.0.1", port))):
    client = socket.create_connection(address, timeout=2)
    conn, peer = listener.accept()
    found = original_destination(conn, peer[0])
    result[label] = None if found is None else [found[0].hex(), found[1]]
    conn.close(); client.close()
print(json.dumps(result))
"""


def test_original_destination_of_ipv4_mapped_and_ipv6_connections(netns: Netns) -> None:
    require_system("iptables", "ip6tables")
    netns.run("ip", "addr", "add", "198.18.2.30/32", "dev", "lo")
    netns.run("ip", "-6", "addr", "add", "fd00:198:18:2::30/128", "dev", "lo", "nodad")
    result = json.loads(netns.run(sys.executable, "-c", ORIGINAL).stdout)
    # An IPv4 client of the dual-stack listener (::ffff:...) is asked with SO_ORIGINAL_DST.
    assert result["v4"] == [socket.inet_pton(socket.AF_INET, "198.18.2.30").hex(), 80]
    assert result["v6"] == [socket.inet_pton(socket.AF_INET6, "fd00:198:18:2::30").hex(), 80]
    # Not NATed: no entry, or the listener's own port (which the server counts as cluster).
    assert result["direct"] is None or result["direct"][1] == result["port"]


# UDP has no SO_ORIGINAL_DST. In a namespace, nat OUTPUT REDIRECTs datagrams
# for an IPv4 and an IPv6 address's port 53 to a dual-stack listener; prints
# what the kernel tells the listener (IP_PKTINFO / IPV6_PKTINFO,
# IP_RECVORIGDSTADDR) and what the conntrack lookup finds, for each, and for
# a datagram sent to the listener's own port.
UDP_ORIGINAL = """
import json, socket, subprocess, sys, time
from uproxy.conntrack import Conntrack
listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.setsockopt(socket.IPPROTO_IP, 8, 1)    # IP_PKTINFO
listener.setsockopt(socket.IPPROTO_IP, 20, 1)   # IP_RECVORIGDSTADDR
listener.setsockopt(socket.IPPROTO_IPV6, 49, 1)  # IPV6_RECVPKTINFO
listener.setsockopt(socket.IPPROTO_IPV6, 74, 1)  # IPV6_RECVORIGDSTADDR
listener.bind(("::", 0))
port = listener.getsockname()[1]
for tool, vip in (("iptables", "198.18.2.31"), ("ip6tables", "fd00:198:18:2::31")):
    subprocess.run([tool, "-t", "nat", "-A", "OUTPUT", "-d", vip, "-p", "udp", "--dport", "53",
                    "-j", "REDIRECT", "--to-ports", str(port)], check=True)
conntrack = Conntrack()
result = {"port": port}
for label, address in (("v4", ("198.18.2.31", 53)), ("v6", ("fd00:198:18:2::31", 53)),
                       ("direct", ("127.0.0.1", port))):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.sendto(b"x", address)
        _, ancillary, _, peer = listener.recvmsg(64, 256)
    seen = {}
    for level, kind, data in ancillary:
        if (level, kind) == (socket.IPPROTO_IP, 8):
            seen["pktinfo"] = socket.inet_ntop(socket.AF_INET, data[8:12])
        elif (level, kind) == (socket.IPPROTO_IPV6, 50):
            seen["pktinfo"] = socket.inet_ntop(socket.AF_INET6, data[:16])
        elif (level, kind) == (socket.IPPROTO_IP, 20):
            seen["origdstaddr_port"] = int.from_bytes(data[2:4], "big")
        elif (level, kind) == (socket.IPPROTO_IPV6, 74):
            seen["origdstaddr_port"] = int.from_bytes(data[2:4], "big")
    local = seen["pktinfo"]
    found = conntrack.udp_original_destination((local, port), (peer[0], peer[1]))
    seen["conntrack"] = None if found is None else [found[0].hex(), found[1]]
    started = time.perf_counter()
    for _ in range(1000):
        conntrack.udp_original_destination((local, port), (peer[0], peer[1]))
    seen["lookup_us"] = (time.perf_counter() - started) * 1000
    result[label] = seen
print(json.dumps(result))
"""


def test_udp_needs_conntrack_for_its_original_destination(netns: Netns) -> None:
    """The measured reason for `uproxy.conntrack`: what the socket is told
    after REDIRECT is the listener's own port; the tracker knows better."""
    require_system("iptables", "ip6tables")
    netns.run("ip", "addr", "add", "198.18.2.31/32", "dev", "lo")
    netns.run("ip", "-6", "addr", "add", "fd00:198:18:2::31/128", "dev", "lo", "nodad")
    result = json.loads(netns.run(sys.executable, "-c", UDP_ORIGINAL).stdout)
    port = result["port"]
    for label, vip in (("v4", "198.18.2.31"), ("v6", "fd00:198:18:2::31")):
        seen = result[label]
        assert seen["origdstaddr_port"] == port  # after NAT: the socket cannot tell
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        assert seen["conntrack"] == [socket.inet_pton(family, vip).hex(), 53]
    direct = result["direct"]["conntrack"]  # not NATed: no entry, or the listener's own port
    assert direct is None or direct[1] == port
    print({label: round(result[label]["lookup_us"], 1) for label in ("v4", "v6")}, "µs/lookup")
