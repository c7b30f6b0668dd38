"""The container image, built by scripts/image.sh and run with podman here:
its tools (and no compiler), --version, explain, rules mode with nft and
iptables serving a backend through a VIP inside `--network none --cap-add
NET_ADMIN` on a read-only root, and the one-line privilege error without
NET_ADMIN. Nothing is
left behind: no containers, no untagged images, no host chains, no sysctl
changes."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_system
from uproxy import __version__

pytestmark = pytest.mark.system

ROOT = Path(__file__).parent.parent.parent
IMAGE = f"localhost/uproxy:{__version__}"
EXAMPLE = ROOT / "uproxy" / "data" / "example-services.yaml"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}

# Run inside the container (sh): a VIP route on lo, a backend, uproxy in rules
# mode; one request through the VIP; SIGTERM; what is left of uproxy's rules.
RULES_MODE = r"""
set -e
ip route add 198.18.1.0/24 dev lo src 127.0.0.1
python3 -c '
import socket
s = socket.socket(); s.bind(("127.0.0.1", 8080)); s.listen(8)
while True:
    c, _ = s.accept(); c.sendall(b"pong"); c.close()
' &
cat > /tmp/services.yaml <<YAML
services:
  - name: web
    clusterIP: 198.18.1.10
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [127.0.0.1]
YAML
uproxy --services /tmp/services.yaml --rules "$1" --healthz-bind-address '' \
  --metrics-bind-address '' --shutdown-grace 1s >/tmp/uproxy.out 2>&1 &
up=$!
answer=$(python3 -c '
import socket, time
deadline = time.monotonic() + 20
while True:
    try:
        with socket.create_connection(("198.18.1.10", 80), timeout=1) as c:
            print(c.recv(10).decode()); break
    except OSError:
        if time.monotonic() > deadline:
            print("no answer"); break
        time.sleep(0.1)
')
kill -TERM $up; wait $up && code=0 || code=$?
left=$( (iptables-save; nft list ruleset) | grep -ci uproxy || true)
echo "{\"answer\": \"$answer\", \"exit\": $code, \"rules_left\": $left}"
"""


def podman(*args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True,
                          check=check, timeout=timeout)


def host_state() -> dict[str, str]:
    """What the tests must not change on the host."""
    def output(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True).stdout

    return {
        "iptables": output("iptables-save"),
        "ip6tables": output("ip6tables-save"),
        "nft": output("nft", "list", "ruleset"),
        # A bridge network would turn forwarding on; the tests use none.
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        "ipv6_forwarding": Path("/proc/sys/net/ipv6/conf/all/forwarding").read_text(),
        "containers": podman("ps", "--all", "--quiet").stdout,
        # Every image without a name, a build's intermediate ones too (which
        # `--filter dangling=true` leaves out while they have a child).
        "untagged": "\n".join(sorted({
            line.split()[0] for line in podman(
                "images", "--all", "--format", "{{.Id}} {{.Names}}").stdout.splitlines()
            if line.endswith(" []")})),
    }


def _comparable(state: dict[str, str]) -> dict[str, str]:
    drop_counters = {k: "\n".join(line for line in v.splitlines() if not line.startswith("#"))
                     for k, v in state.items()}
    return drop_counters


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    require_system("podman", "runc", "mmdebstrap", "iptables-save", "ip6tables-save", "nft")
    before = host_state()
    built = subprocess.run(["bash", str(ROOT / "scripts" / "image.sh")], env=ENV,
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    yield IMAGE
    after = host_state()
    # Untagged images that were there before may go (another build's); new ones must not stay.
    left_untagged = set(after.pop("untagged").split()) - set(before.pop("untagged").split())
    assert not left_untagged, f"untagged images left behind: {sorted(left_untagged)}"
    # Counters in iptables-save's header comments move with host traffic; rules must not.
    assert _comparable(after) == _comparable(before)


def run(image: str, *args: str, caps: tuple[str, ...] = (), entrypoint: str | None = None,
        mounts: tuple[str, ...] = (), options: tuple[str, ...] = ()
        ) -> subprocess.CompletedProcess[str]:
    command = ["run", "--rm", "--network", "none", "--name", f"uproxy-test-{uuid.uuid4().hex[:8]}",
               "--cap-drop", "ALL", *[f"--cap-add={cap}" for cap in caps], *options]
    for mount in mounts:
        command += ["--volume", mount]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    return podman(*command, image, *args, check=False)


def test_the_image_says_its_version(image: str) -> None:
    result = run(image, "--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"uproxy {__version__}")


# What rules mode may call on a node, both iptables variants among them; and
# what the build stage had that must not reach the image.
TOOLS = ("iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft",
         "iptables-restore", "nft", "conntrack", "ip")
BUILD_ONLY = ("gcc", "cc", "x86_64-linux-gnu-gcc-12", "pip", "pip3")


def test_the_image_holds_the_rule_tools_and_no_compiler(image: str) -> None:
    names = " ".join((*TOOLS, *BUILD_ONLY))
    result = run(image, "-c", f"for name in {names}; do command -v $name >/dev/null "
                              "&& echo $name; done; true", entrypoint="sh")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == set(TOOLS)


def test_explain_runs_on_the_bundled_example(image: str) -> None:
    result = run(image, "explain", "--services", "/example.yaml", "--rules", "nft",
                 mounts=(f"{EXAMPLE}:/example.yaml:ro",))
    assert result.returncode == 0, result.stderr
    assert "# Packet paths (nft backend)" in result.stdout
    assert "demo/web:http 80/TCP -> listener" in result.stdout


@pytest.mark.parametrize("rules", ["nft", "iptables"])
def test_rules_mode_serves_a_vip_with_only_net_admin(
    image: str, rules: str, tmp_path: Path
) -> None:
    # As deploy/daemonset.yaml runs it: a read-only root, /tmp an empty
    # directory, the xtables lock a file of the host's.
    lock = tmp_path / "xtables.lock"
    lock.touch()
    result = run(image, "-c", RULES_MODE, "sh", rules, caps=("NET_ADMIN",), entrypoint="sh",
                 mounts=(f"{lock}:/run/xtables.lock",),
                 options=("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"answer": "pong", "exit": 0, "rules_left": 0}, result.stdout


@pytest.mark.parametrize("rules", ["nft", "iptables"])
def test_without_net_admin_uproxy_says_so_in_one_line(image: str, rules: str) -> None:
    result = run(image, "--services", "/example.yaml", "--rules", rules,
                 mounts=(f"{EXAMPLE}:/example.yaml:ro",))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], result.stderr
