"""The whole `uproxy` command with real kernel rules, in network namespaces.

Timeline per variant: a "node" namespace runs `uproxy --services FILE
--rules BACKEND` and tagged TCP/UDP servers (the endpoints); a "client"
namespace, joined by a veth pair, routes the service range through the
node. Clients reach the endpoints round-robin through the cluster IP (nat
OUTPUT on the node, PREROUTING from the client), an external IP and the
node port; UDP replies come from VIP:53. Editing the services file (and
SIGHUP) moves or removes rules and listeners; a hand-flushed chain comes
back within --sync-period; kill -9 and a restart leave one copy of every
rule; SIGTERM and `uproxy --cleanup` leave nothing behind.

Variants: `--rules iptables` and `--rules nft` on this host as it is (its
iptables is the nf_tables variant), and `--rules iptables` and `--rules
iptc` as on a legacy-xtables host: uproxy runs with a folder of
`iptables -> iptables-legacy` links (all six tools) first in PATH, and the
test reads the kernel's rules with the legacy tools.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.conftest import Netns, require_system
from tests.system.topology import (
    NODE_IP,
    NODE_IP6,
    TAGGED_SERVERS,
    XTABLES_TOOLS,
    legacy_name,
    legacy_xtables_bin,
    node_and_client,
    running_server,
)

pytestmark = pytest.mark.system

WEB_VIP, DNS_VIP, EXTERNAL_IP = "198.18.1.10", "198.18.1.53", "198.18.2.10"
NODE_PORT = 30080
SYNC_PERIOD = 2.0

# A client run inside a namespace: prints one JSON line per attempt.
CLIENT = """
import json, socket, sys
proto, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
timeout = float(sys.argv[5])
for _ in range(count):
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=timeout) as s:
                print(json.dumps({"reply": s.recv(100).decode()}))
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(min(timeout, 1))
                s.sendto(b"hi", (host, port))
                data, source = s.recvfrom(100)
                print(json.dumps({"reply": data.decode(), "source": list(source[:2])}))
    except OSError as e:
        print(json.dumps({"error": type(e).__name__}))
"""

# Exit 0 when (proto, port) on 0.0.0.0 can be bound, i.e. no listener holds it
# (SO_REUSEADDR: connections the listener accepted may linger in TIME_WAIT).
FREE = """
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[2])))
except OSError:
    sys.exit(1)
"""


def services_yaml(web_port: int = 80, with_dns: bool = True) -> str:
    services = [{
        "name": "web", "clusterIP": WEB_VIP, "externalIPs": [EXTERNAL_IP],
        "ports": [{"name": "http", "port": web_port, "targetPort": 8080, "protocol": "TCP",
                   "nodePort": NODE_PORT}],
        "endpoints": ["127.0.0.1", "127.0.0.2"],
    }]
    if with_dns:
        services.append({
            "name": "dns", "namespace": "kube-system", "clusterIP": DNS_VIP,
            "ports": [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}],
            "endpoints": ["127.0.0.1"],
        })
    return json.dumps({"services": services})


@dataclass(frozen=True)
class Variant:
    """How a test runs uproxy: its `--rules`, and on which kind of host."""

    rules: str
    legacy_bin: Path | None = None  # links iptables -> iptables-legacy etc., first in PATH

    @property
    def legacy(self) -> bool:
        return self.legacy_bin is not None

    def command(self, *argv: str) -> list[str]:
        """argv as this variant's host runs it (its PATH)."""
        if self.legacy_bin is None:
            return list(argv)
        return ["env", f"PATH={self.legacy_bin}{os.pathsep}{os.environ.get('PATH', '')}", *argv]

    def uproxy(self, *args: str) -> list[str]:
        return self.command(sys.executable, "-m", "uproxy", *args)

    def tool(self, name: str) -> str:
        """An iptables tool for the test's own reading and editing of this variant's rules."""
        return legacy_name(name) if self.legacy else name


# id -> (--rules, as on a legacy-xtables host)
VARIANTS = {
    "iptables": ("iptables", False),
    "nft": ("nft", False),
    "iptables-legacy-host": ("iptables", True),
    "iptc-legacy-host": ("iptc", True),
}
FULL = list(VARIANTS)


@pytest.fixture
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Variant:
    """Parametrised indirectly with an id of VARIANTS."""
    rules, legacy = VARIANTS[request.param]
    if not legacy:
        return Variant(rules)
    require_system(*map(legacy_name, XTABLES_TOOLS))
    return Variant(rules, legacy_xtables_bin(tmp_path_factory.getbasetemp() / "legacy-bin"))


@pytest.fixture
def topology() -> Iterator[tuple[Netns, Netns]]:
    require_system("iptables", "nft")
    with node_and_client("e") as (node, client), running_server(
        node, TAGGED_SERVERS, "127.0.0.1,8080,a", "127.0.0.2,8080,b", "127.0.0.1,5353,dns",
        "::1,5353,dns6",
    ):
        yield node, client


class Uproxy:
    """The uproxy command running in the node namespace."""

    def __init__(self, node: Netns, variant: Variant, services: Path) -> None:
        self.node = node
        self.variant = variant
        self.services = services
        self.log = services.parent / f"uproxy-{uuid.uuid4().hex[:4]}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = self.node.popen(
                *self.variant.uproxy("--services", str(self.services),
                "--rules", self.variant.rules, "--healthz-bind-address", "",
                "--metrics-bind-address", "", "--min-sync-period", "0s",
                "--sync-period", f"{SYNC_PERIOD:g}s", "--shutdown-grace", "1s"),
                stdout=subprocess.DEVNULL, stderr=log)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float = 10) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


class StartUproxy(Protocol):
    def __call__(self, variant: Variant, text: str | None = None) -> Uproxy: ...


@pytest.fixture
def start_uproxy(
    topology: tuple[Netns, Netns], tmp_path: Path
) -> Iterator[StartUproxy]:
    node, _ = topology
    started: list[Uproxy] = []
    services = tmp_path / "services.json"
    services.write_text(services_yaml())

    def start(variant: Variant, text: str | None = None) -> Uproxy:
        if text is not None:
            services.write_text(text)
        proxy = Uproxy(node, variant, services)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    # With no --rules, every kind: the host's iptables, the legacy tables and nft.
    node.run(sys.executable, "-m", "uproxy", "--cleanup", check=False)


def attempts(ns: Netns, proto: str, host: str, port: int, count: int = 1,
             timeout: float = 2) -> list[dict[str, str]]:
    out = ns.run(sys.executable, "-c", CLIENT, proto, host, str(port), str(count),
                 str(timeout)).stdout
    return [json.loads(line) for line in out.splitlines()]


def reply(ns: Netns, proto: str, host: str, port: int, timeout: float = 2) -> str:
    (answer,) = attempts(ns, proto, host, port, timeout=timeout)
    return answer.get("reply") or f"error {answer.get('error')}"


# A served address answers within milliseconds here (loopback, one veth); one
# that no rule steers any more times out (or is refused) instead.
UNSERVED_WAIT = 0.5


def unserved(ns: Netns, proto: str, host: str, port: int) -> bool:
    return reply(ns, proto, host, port, timeout=UNSERVED_WAIT).startswith("error")


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.1)


def dump(node: Netns, variant: Variant) -> str:
    """The kernel's rules the variant writes, without comments lines and counters."""
    if variant.rules == "nft":
        text = node.run("nft", "list", "ruleset").stdout
    else:
        text = (node.run(variant.tool("iptables-save")).stdout
                + node.run(variant.tool("ip6tables-save")).stdout)
    # Legacy iptables-save counts packets per chain (`:OUTPUT ACCEPT [2:152]`):
    # traffic in the namespace between two dumps must not make them differ.
    return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in text.splitlines()
                     if line.strip() and not line.startswith("#")) + "\n"


def ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if "uproxy" in line.lower()]


def other_xtables(node: Netns, variant: Variant) -> str:
    """The iptables variant the variant does not write (legacy or nf_tables), both families."""
    tools = (("iptables-save", "ip6tables-save") if variant.legacy
             else (legacy_name("iptables-save"), legacy_name("ip6tables-save")))
    return "".join(node.run(tool).stdout for tool in tools)


def rule_lines(node: Netns, variant: Variant) -> list[str]:
    """One line per rule or map element uproxy installed."""
    text = dump(node, variant)
    if variant.rules == "nft":
        # Elements are listed one a line when there are many; split the short form too.
        return [part.strip() for line in text.splitlines() if "comment" in line
                for part in line.split(",") if "comment" in part]
    return [line for line in text.splitlines() if line.startswith("-A ")
            and ("UPROXY" in line)]


def proxy_port(node: Netns, variant: Variant, comment: str) -> int:
    text = dump(node, variant)
    pattern = (rf'comment "{re.escape(comment)}" : (\d+)' if variant.rules == "nft"
               else rf'--comment "?{re.escape(comment)}"? -j REDIRECT --to-ports (\d+)')
    found = re.search(pattern, text)
    assert found is not None, text
    return int(found.group(1))


def is_free(node: Netns, proto: str, port: int) -> bool:
    return node.run(sys.executable, "-c", FREE, proto, str(port), check=False).returncode == 0


def serving(node: Netns) -> bool:
    return reply(node, "tcp", WEB_VIP, 80) in ("a", "b")


@pytest.mark.parametrize("variant", FULL, indirect=True)
def test_serves_every_path_and_follows_the_services_file(
    variant: Variant, topology: tuple[Netns, Netns], start_uproxy: StartUproxy,
) -> None:
    node, client = topology
    proxy = start_uproxy(variant)
    eventually(lambda: serving(node), 10, f"{WEB_VIP}:80 served\n{proxy.logs()}")

    # nat OUTPUT: round-robin over both endpoints.
    tags = [a.get("reply", "") for a in attempts(node, "tcp", WEB_VIP, 80, 10)]
    assert sorted(tags) == ["a"] * 5 + ["b"] * 5
    assert all(tags[i] != tags[i + 1] for i in range(9))
    # UDP: the reply comes from the address the client used.
    assert attempts(node, "udp", DNS_VIP, 53) == [{"reply": "dns:hi", "source": [DNS_VIP, 53]}]
    # nat PREROUTING from the other namespace: VIP, external IP, node port, DNS.
    from_client = [reply(client, "tcp", WEB_VIP, 80), reply(client, "tcp", EXTERNAL_IP, 80),
                   reply(client, "tcp", NODE_IP, NODE_PORT),
                   reply(client, "tcp", NODE_IP, NODE_PORT)]
    assert set(from_client) == {"a", "b"}
    assert attempts(client, "udp", DNS_VIP, 53) == [{"reply": "dns:hi", "source": [DNS_VIP, 53]}]
    assert reply(node, "tcp", NODE_IP, NODE_PORT) in ("a", "b")
    rules = rule_lines(node, variant)
    assert len(rules) == len(set(rules)) > 0
    assert ours(other_xtables(node, variant)) == []  # only the variant's own tables

    # Hand-flushed chains come back within --sync-period.
    if variant.rules == "nft":
        node.run("nft", "flush", "chain", "ip", "uproxy", "portals_host")
    else:
        node.run(variant.tool("iptables"), "-t", "nat", "-F", "UPROXY-PORTALS-HOST")
    node.run("conntrack", "-F", check=False)
    assert unserved(node, "tcp", WEB_VIP, 80)
    eventually(lambda: serving(node), SYNC_PERIOD + 3, "flushed chain repaired")
    assert sorted(rule_lines(node, variant)) == sorted(rules)

    # Changing the port moves the rule and the listener.
    old_web = proxy_port(node, variant, "default/web:http")
    proxy.services.write_text(services_yaml(web_port=8000))
    proxy.signal(signal.SIGHUP)
    eventually(lambda: reply(node, "tcp", WEB_VIP, 8000) in ("a", "b"), 5, "port 8000 served")
    node.run("conntrack", "-F", check=False)
    assert unserved(node, "tcp", WEB_VIP, 80)
    assert reply(client, "tcp", WEB_VIP, 8000) in ("a", "b")
    new_web = proxy_port(node, variant, "default/web:http")
    assert new_web != old_web
    assert is_free(node, "tcp", old_web)
    assert not is_free(node, "tcp", new_web)

    # Removing a service removes its rules and closes its listener.
    dns_port = proxy_port(node, variant, "kube-system/dns:dns")
    assert not is_free(node, "udp", dns_port)
    proxy.services.write_text(services_yaml(web_port=8000, with_dns=False))
    proxy.signal(signal.SIGHUP)
    eventually(lambda: "kube-system/dns" not in dump(node, variant), 5, "dns rules removed")
    node.run("conntrack", "-F", check=False)
    assert attempts(node, "udp", DNS_VIP, 53, timeout=UNSERVED_WAIT) == [
        {"error": "TimeoutError"}]
    assert is_free(node, "udp", dns_port)

    # SIGTERM: rules removed, exit 0.
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0, proxy.logs()
    assert ours(dump(node, variant)) == []
    assert unserved(node, "tcp", WEB_VIP, 8000)


@pytest.mark.parametrize("variant", FULL, indirect=True)
def test_restart_after_kill_keeps_one_copy_and_cleanup_removes_everything(
    variant: Variant, topology: tuple[Netns, Netns], start_uproxy: StartUproxy,
) -> None:
    node, client = topology
    first = start_uproxy(variant)
    eventually(lambda: serving(node), 10, f"served\n{first.logs()}")
    once = sorted(rule_lines(node, variant))
    jumps_once = sorted(ours(dump(node, variant)))

    first.signal(signal.SIGKILL)
    first.wait()
    assert sorted(rule_lines(node, variant)) == once  # a killed process leaves its rules

    second = start_uproxy(variant)
    # The restarted process has its own listeners: wait until its rules point there.
    eventually(lambda: serving(node) and reply(client, "tcp", WEB_VIP, 80) in ("a", "b"),
               10, f"served after restart\n{second.logs()}")
    after = sorted(rule_lines(node, variant))
    assert len(after) == len(once) == len(set(after))
    assert len(ours(dump(node, variant))) == len(jumps_once)

    second.signal(signal.SIGKILL)
    second.wait()
    cleaned = node.run(*variant.uproxy("--cleanup", "--rules", variant.rules), check=False)
    assert cleaned.returncode == 0, cleaned.stderr
    assert ours(dump(node, variant)) == []
    assert unserved(node, "tcp", WEB_VIP, 80)
    again = node.run(*variant.uproxy("--cleanup"), check=False)
    assert again.returncode == 0, again.stderr
    assert ours(dump(node, variant)) == []


def test_cleanup_with_nothing_to_remove_exits_0(netns: Netns) -> None:
    require_system("iptables", "nft")
    for kinds in ((), ("--rules", "iptables"), ("--rules", "nft"), ("--rules", "iptc")):
        done = netns.run(sys.executable, "-m", "uproxy", "--cleanup", *kinds, check=False)
        assert done.returncode == 0, (kinds, done.stderr)
    assert "uproxy" not in netns.run("nft", "list", "ruleset").stdout.lower()


def test_iptc_on_an_nft_variant_host_refuses_in_one_line(netns: Netns, tmp_path: Path) -> None:
    require_system("iptables")
    version = netns.run("iptables", "--version").stdout
    if "nf_tables" not in version:
        pytest.skip(f"this host's iptables is legacy ({version.strip()}): iptc can run")
    services = tmp_path / "services.json"
    services.write_text(services_yaml())
    done = netns.run(sys.executable, "-m", "uproxy", "--services", str(services),
                     "--rules", "iptc", "--healthz-bind-address", "",
                     "--metrics-bind-address", "", check=False, timeout=20)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert "nf_tables" in errors[0] and "--rules iptables or nft" in errors[0]


def test_is_free_tells_a_held_port(netns: Netns) -> None:
    """The helper the timelines rely on to see a closed listener."""
    holder = netns.popen(sys.executable, "-c",
                         "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 41999));"
                         " s.listen(); print('ready', flush=True); time.sleep(30)",
                         stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        assert not is_free(netns, "tcp", 41999)
    finally:
        holder.kill()
        holder.wait(5)
    assert is_free(netns, "tcp", 41999)


WEB6_VIP, WEB6_VIP4, DNS6_VIP = "fd00:198:18:1::10", "198.18.1.60", "fd00:198:18:1::53"
NODE_PORT6 = 30081


def ipv6_services_yaml() -> str:
    """A dual-stack TCP service (one listener for both families) and an IPv6-only UDP one.

    An IPv6-only service uses IPv6 endpoints only (as its EndpointSlices
    would be of addressType IPv6), so the DNS endpoint is ::1.
    """
    return json.dumps({"services": [
        {"name": "web6", "clusterIPs": [WEB6_VIP4, WEB6_VIP],
         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                    "nodePort": NODE_PORT6}],
         "endpoints": ["127.0.0.1", "127.0.0.2"]},
        {"name": "dns6", "namespace": "kube-system", "clusterIP": DNS6_VIP,
         "ports": [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}],
         "endpoints": ["::1"]},
    ]})


def proxy_ports(node: Netns, variant: Variant, comment: str) -> dict[int, set[int]]:
    """IP family -> the proxy ports the portal rules with this comment point to."""
    if variant.rules == "nft":
        texts = {4: node.run("nft", "list", "table", "ip", "uproxy", check=False).stdout,
                 6: node.run("nft", "list", "table", "ip6", "uproxy", check=False).stdout}
        pattern = rf'comment "{re.escape(comment)}" : (\d+)'
    else:
        texts = {4: node.run(variant.tool("iptables-save"), "-t", "nat").stdout,
                 6: node.run(variant.tool("ip6tables-save"), "-t", "nat").stdout}
        pattern = rf'--comment "?{re.escape(comment)}"? -j REDIRECT --to-ports (\d+)'
    return {family: {int(port) for port in re.findall(pattern, text)}
            for family, text in texts.items()}


@pytest.mark.parametrize("variant", FULL, indirect=True)
def test_ipv6_cluster_ips_get_ipv6_rules_and_a_dual_stack_listener(
    variant: Variant, topology: tuple[Netns, Netns], start_uproxy: StartUproxy,
) -> None:
    node, client = topology
    proxy = start_uproxy(variant, ipv6_services_yaml())
    eventually(lambda: reply(node, "tcp", WEB6_VIP, 80) in ("a", "b"), 10,
               f"[{WEB6_VIP}]:80 served\n{proxy.logs()}\n{dump(node, variant)}")

    # nat OUTPUT (REDIRECT lands on ::1): round-robin over both endpoints.
    tags = [a.get("reply", "") for a in attempts(node, "tcp", WEB6_VIP, 80, 4)]
    assert sorted(tags) == ["a", "a", "b", "b"]
    # One listener on `::` takes the IPv4 cluster IP of the same port too.
    assert reply(node, "tcp", WEB6_VIP4, 80) in ("a", "b")
    ports = proxy_ports(node, variant, "default/web6:http")
    assert len(ports[4]) == 1 and ports[4] == ports[6], ports
    # nat PREROUTING from the other namespace over IPv6: cluster IP and node port.
    assert {reply(client, "tcp", WEB6_VIP, 80), reply(client, "tcp", WEB6_VIP, 80)} == {"a", "b"}
    assert reply(client, "tcp", NODE_IP6, NODE_PORT6) in ("a", "b")
    assert reply(client, "tcp", WEB6_VIP4, 80) in ("a", "b")
    # UDP over IPv6: the reply comes from [VIP]:53, on both paths.
    for ns in (node, client):
        assert attempts(ns, "udp", DNS6_VIP, 53) == [
            {"reply": "dns6:hi", "source": [DNS6_VIP, 53]}]
    # The IPv6-only service has IPv6 rules only.
    dns_ports = proxy_ports(node, variant, "kube-system/dns6:dns")
    assert len(dns_ports[6]) == 1 and dns_ports[4] == set(), dns_ports

    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0, proxy.logs()
    assert ours(dump(node, variant)) == []
    node.run("conntrack", "-F", check=False)
    assert unserved(node, "tcp", WEB6_VIP, 80)


@pytest.mark.parametrize("variant", ["iptc-legacy-host"], indirect=True)
def test_cleanup_with_no_rules_on_a_legacy_host_removes_what_iptc_made(
    variant: Variant, topology: tuple[Netns, Netns], start_uproxy: StartUproxy,
) -> None:
    """libiptc's IPv4 chains and the ip6tables-restore IPv6 half, after a kill -9."""
    node, _ = topology
    both = json.loads(services_yaml())["services"] + json.loads(ipv6_services_yaml())["services"]
    proxy = start_uproxy(variant, json.dumps({"services": both}))
    eventually(lambda: serving(node)
               and bool(proxy_ports(node, variant, "kube-system/dns6:dns")[6]),
               10, f"IPv4 and IPv6 rules in place\n{proxy.logs()}")
    made = dump(node, variant)
    for comment in ("default/web:http", "kube-system/dns:dns", "default/web6:http",
                    "kube-system/dns6:dns"):
        assert comment in made, (comment, made)
    proxy.signal(signal.SIGKILL)
    proxy.wait()
    assert dump(node, variant) == made  # a killed process leaves its rules

    cleaned = node.run(*variant.uproxy("--cleanup"), check=False)
    assert cleaned.returncode == 0, cleaned.stderr
    assert ours(dump(node, variant)) == []
    assert ours(other_xtables(node, variant)) == []
    node.run("conntrack", "-F", check=False)
    assert unserved(node, "tcp", WEB_VIP, 80)
