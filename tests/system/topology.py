"""The two-namespace topology system tests share.

`node` is where uproxy and its rules live; `client` is another host joined
to it by a veth pair, routing the VIP ranges via the node. IPv4 addresses are
all in 198.18.0.0/15; IPv6 ones in fd00:198:18::/48 (a ULA prefix), used only
inside these namespaces.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import Netns

NODE_IP = "198.18.3.1"
CLIENT_IP = "198.18.3.2"
VIP_NETS = ("198.18.1.0/24", "198.18.2.0/24")
NODE_IP6 = "fd00:198:18:3::1"
CLIENT_IP6 = "fd00:198:18:3::2"
VIP6_NETS = ("fd00:198:18:1::/64", "fd00:198:18:2::/64")


def make_netns(name: str) -> Netns:
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


@contextlib.contextmanager
def node_and_client(label: str) -> Iterator[tuple[Netns, Netns]]:
    """Two namespaces joined by veth; removed on exit."""
    tag = uuid.uuid4().hex[:6]
    node = make_netns(f"uproxy-{label}n-{tag}")
    client = make_netns(f"uproxy-{label}c-{tag}")
    try:
        node_link, client_link = f"u{label}n{tag}", f"u{label}c{tag}"
        subprocess.run(["ip", "link", "add", node_link, "netns", node.name, "type", "veth",
                        "peer", "name", client_link, "netns", client.name], check=True)
        node.run("ip", "addr", "add", f"{NODE_IP}/24", "dev", node_link)
        node.run("ip", "link", "set", node_link, "up")
        client.run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", client_link)
        client.run("ip", "link", "set", client_link, "up")
        # Locally generated traffic to a VIP needs a route before nat OUTPUT sees it.
        node.run("ip", "addr", "add", "198.18.0.1/32", "dev", "lo")
        for net in VIP_NETS:
            node.run("ip", "route", "add", net, "dev", "lo", "src", "198.18.0.1")
            client.run("ip", "route", "add", net, "via", NODE_IP)
        # The same for IPv6; nodad: the addresses are usable at once, not after DAD.
        node.run("ip", "-6", "addr", "add", f"{NODE_IP6}/64", "dev", node_link, "nodad")
        client.run("ip", "-6", "addr", "add", f"{CLIENT_IP6}/64", "dev", client_link, "nodad")
        node.run("ip", "-6", "addr", "add", "fd00:198:18::1/128", "dev", "lo")
        for net in VIP6_NETS:
            node.run("ip", "-6", "route", "add", net, "dev", "lo", "src", "fd00:198:18::1")
            client.run("ip", "-6", "route", "add", net, "via", NODE_IP6)
        yield node, client
    finally:
        for ns in (node, client):
            subprocess.run(["ip", "netns", "del", ns.name], check=False)


@contextlib.contextmanager
def running_server(ns: Netns, script: str, *args: str) -> Iterator[None]:
    """A Python server script in `ns` that prints "ready" once it listens; killed on exit."""
    server = ns.popen(sys.executable, "-c", script, *args, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"ready"
        yield
    finally:
        server.kill()
        server.wait(5)


# The six tools a host's iptables variant is made of; `legacy_name` gives each
# one's legacy binary (iptables-save -> iptables-legacy-save).
XTABLES_TOOLS = ("iptables", "iptables-save", "iptables-restore",
                 "ip6tables", "ip6tables-save", "ip6tables-restore")


def legacy_name(tool: str) -> str:
    return tool.replace("tables", "tables-legacy", 1)


def legacy_xtables_bin(directory: Path) -> Path:
    """A folder of links `iptables -> .../iptables-legacy` (all six tools).

    First in PATH, it makes this host a legacy-xtables host for a process:
    every iptables tool it runs by name is the legacy one. `directory` is
    made; a missing legacy binary is a RuntimeError naming it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for tool in XTABLES_TOOLS:
        target = shutil.which(legacy_name(tool))
        if target is None:
            raise RuntimeError(f"no {legacy_name(tool)!r} command for a legacy-xtables PATH")
        link = directory / tool
        if not link.is_symlink():
            link.symlink_to(target)
    return directory


# Endpoints: TCP and UDP on each (ip, port, tag); every answer names its tag.
TAGGED_SERVERS = """
import socket, sys, threading
def tcp(sock, tag):
    while True:
        conn, _ = sock.accept()
        try:
            conn.sendall(tag.encode())
        finally:
            conn.close()
def udp(sock, tag):
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(tag.encode() + b":" + data, peer)
for spec in sys.argv[1:]:
    ip, port, tag = spec.split(",")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    t = socket.socket(family); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((ip, int(port))); t.listen(64)
    u = socket.socket(family, socket.SOCK_DGRAM); u.bind((ip, int(port)))
    threading.Thread(target=tcp, args=(t, tag), daemon=True).start()
    threading.Thread(target=udp, args=(u, tag), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""
