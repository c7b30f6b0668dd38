"""Rules mode with least privilege, and what a crash leaves behind.

Least privilege: the whole `uproxy --rules iptables|nft` command runs as
uid 65534 with CAP_NET_ADMIN as its only capability (setpriv), serves a VIP
from the namespace itself, and SIGTERM removes its rules. Without
CAP_NET_ADMIN, every backend and `--cleanup` stop at start with one line
naming it, and exit 1.

Crash: an exception injected into the source, or into a sync after the
rules are in, ends uproxy with exit code 1, its traceback logged once, and
no rule of uproxy's left in the kernel.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Netns, require_system
from tests.system.topology import legacy_xtables_bin

pytestmark = pytest.mark.system

VIP = "198.18.1.10"
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]
ONLY_NET_ADMIN = [*NOBODY, "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
                  "--bounding-set=-all,+net_admin"]
NO_CAPS = [*NOBODY, "--inh-caps=-all", "--bounding-set=-all"]
ROOT_NO_CAPS = ["--inh-caps=-all", "--bounding-set=-all"]

BACKEND = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 18080)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"pong"); c.close()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
        print(s.recv(100).decode())
except OSError as e:
    print("error", type(e).__name__)
"""

# uproxy with one failure injected, then the real command line.
CRASHING = """
import asyncio, sys
from pathlib import Path
where, trigger = sys.argv[1], Path(sys.argv[2])

async def when_triggered():
    while not trigger.exists():
        await asyncio.sleep(0.05)
    raise RuntimeError(f"injected failure in the {where}")

if where == "source":
    from uproxy.sources.file import FileSource
    real_run = FileSource.run
    async def run(self, sink):
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(real_run(self, sink))
            await when_triggered()
    FileSource.run = run
else:
    from uproxy.proxier import Proxier
    real_sync = Proxier.sync
    async def sync(self):
        if trigger.exists():
            raise RuntimeError("injected failure in the sync")
        return await real_sync(self)
    Proxier.sync = sync

from uproxy.cli import main
sys.exit(main(sys.argv[3:]))
"""


def services(path: Path) -> Path:
    path.write_text(json.dumps({"services": [{
        "name": "web", "clusterIP": VIP,
        "ports": [{"port": 80, "targetPort": 18080}], "endpoints": ["127.0.0.1"]}]}))
    path.chmod(0o644)
    return path


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A folder uid 65534 can read (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="uproxy-privilege-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node(netns: Netns) -> Iterator[Netns]:
    """A namespace whose own traffic to the VIP range reaches nat OUTPUT, with a backend."""
    require_system("iptables", "nft", "setpriv")
    netns.run("ip", "addr", "add", "198.18.0.1/32", "dev", "lo")
    netns.run("ip", "route", "add", "198.18.1.0/24", "dev", "lo", "src", "198.18.0.1")
    backend = netns.popen(sys.executable, "-c", BACKEND, stdout=subprocess.PIPE)
    try:
        assert backend.stdout is not None and backend.stdout.readline().strip() == b"ready"
        yield netns
    finally:
        backend.kill()
        backend.wait(5)


def our_rules(ns: Netns, legacy: bool = False) -> str:
    """uproxy's rules in the kernel: its iptables chains and jumps, its nft tables."""
    suffix = "-legacy" if legacy else ""
    text = ns.run(f"iptables{suffix}-save").stdout + ns.run(f"ip6tables{suffix}-save").stdout
    ours = [line for line in text.splitlines() if "uproxy" in line.lower()]
    for family in ("ip", "ip6"):
        ours += ns.run("nft", "list", "table", family, "uproxy", check=False).stdout.splitlines()
    return "\n".join(ours)


def legacy_host(tmp_path: Path, command: list[str]) -> list[str]:
    """`command` as on a legacy-xtables host: iptables -> iptables-legacy first in PATH.
    (env runs before setpriv: as uid 65534 it could not reach this Python under /root.)"""
    path = legacy_xtables_bin(tmp_path / "legacy-bin")
    return ["env", f"PATH={path}:/usr/sbin:/usr/bin:/sbin:/bin", *command]


def wait_until(check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout}s: {check}")


def talk(ns: Netns) -> str:
    return ns.run(sys.executable, "-c", CLIENT, VIP, "80").stdout.strip()


UPROXY_FLAGS = ["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "",
                "--sync-period", "1s", "--min-sync-period", "0s", "--shutdown-grace", "1s"]


@pytest.mark.parametrize("rules", ["iptables", "nft"])
def test_rules_mode_serves_as_nobody_with_only_cap_net_admin(
    node: Netns, tmp_path: Path, rules: str
) -> None:
    file = services(tmp_path / "services.json")
    process = node.popen("setpriv", *ONLY_NET_ADMIN, sys.executable, "-m", "uproxy",
                         "--services", str(file), "--rules", rules, *UPROXY_FLAGS,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: talk(node) == "pong")
        assert "default/web" in our_rules(node)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "ERROR" not in stderr, stderr
    assert our_rules(node) == ""


@pytest.mark.parametrize("capabilities", [NO_CAPS, ROOT_NO_CAPS], ids=["nobody", "root"])
@pytest.mark.parametrize("rules", ["iptables", "nft", "iptc", "cleanup"])
def test_without_cap_net_admin_start_stops_with_one_line_naming_it(
    node: Netns, tmp_path: Path, rules: str, capabilities: list[str]
) -> None:
    file = services(tmp_path / "services.json")
    if rules == "cleanup":
        args = ["--cleanup"]
    else:
        args = ["--services", str(file), "--rules", rules, *UPROXY_FLAGS]
    command = ["setpriv", *capabilities, sys.executable, "-m", "uproxy", *args]
    if rules == "iptc":  # python-iptables edits legacy xtables only: be a legacy host
        command = legacy_host(tmp_path, command)
    result = node.run(*command, check=False, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("uproxy: error: ") and "CAP_NET_ADMIN" in lines[0], lines
    assert our_rules(node) == ""


NET_ADMIN_AND_RAW = [*NOBODY, "--inh-caps=-all,+net_admin,+net_raw",
                     "--ambient-caps=-all,+net_admin,+net_raw",
                     "--bounding-set=-all,+net_admin,+net_raw"]
ROOT_ONLY_NET_ADMIN = ["--inh-caps=-all,+net_admin", "--bounding-set=-all,+net_admin"]


@pytest.mark.parametrize("rules", ["iptables", "iptc"])
@pytest.mark.parametrize("capabilities", [ONLY_NET_ADMIN, ROOT_ONLY_NET_ADMIN],
                         ids=["nobody", "root"])
def test_legacy_xtables_without_cap_net_raw_stop_with_one_line_naming_it(
    node: Netns, tmp_path: Path, rules: str, capabilities: list[str]
) -> None:
    """libiptc talks through a raw socket: CAP_NET_ADMIN alone is refused, uid 0 too."""
    file = services(tmp_path / "services.json")
    result = node.run(*legacy_host(tmp_path, [
        "setpriv", *capabilities, sys.executable, "-m", "uproxy", "--services", str(file),
        "--rules", rules, *UPROXY_FLAGS]), check=False, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "CAP_NET_RAW" in lines[0] and "CAP_NET_ADMIN" in lines[0], lines[0]
    assert our_rules(node, legacy=True) == ""


def test_a_legacy_xtables_lock_that_nobody_may_open_is_named_at_start(
    node: Netns, tmp_path: Path
) -> None:
    """iptables-legacy takes /run/xtables.lock (root's, 0600): capabilities do not help."""
    xtables_lock = Path("/run/xtables.lock")
    xtables_lock.touch(mode=0o600)
    if xtables_lock.stat().st_mode & 0o004:
        pytest.skip(f"{xtables_lock} is readable by every user on this host")
    file = services(tmp_path / "services.json")
    result = node.run(*legacy_host(tmp_path, [
        "setpriv", *NET_ADMIN_AND_RAW, sys.executable, "-m", "uproxy", "--services", str(file),
        "--rules", "iptables", *UPROXY_FLAGS]), check=False, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "the lock /run/xtables.lock, which uid 65534 cannot read" in lines[0], lines[0]


def test_legacy_xtables_serve_as_nobody_with_net_admin_net_raw_and_a_readable_lock(
    node: Netns, tmp_path: Path
) -> None:
    """With the lock readable (here a file of the test's, mounted over the
    host's in a mount namespace of this command only), a legacy host works
    without root: iptables-legacy-save cannot list the tables (a root-only
    /proc file), so uproxy names them one by one."""
    readable = tmp_path / "xtables.lock"
    readable.touch(mode=0o644)
    readable.chmod(0o644)
    file = services(tmp_path / "services.json")
    command = legacy_host(tmp_path, [
        "setpriv", *NET_ADMIN_AND_RAW, sys.executable, "-m", "uproxy", "--services", str(file),
        "--rules", "iptables", *UPROXY_FLAGS])
    process = node.popen("unshare", "--mount", "--propagation", "private", "sh", "-c",
                         f'mount --bind {readable} /run/xtables.lock && exec "$@"', "sh",
                         *command, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: talk(node) == "pong")
        assert "default/web" in our_rules(node, legacy=True)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "ERROR" not in stderr, stderr
    assert our_rules(node, legacy=True) == ""


@pytest.mark.parametrize("where", ["source", "sync"])
@pytest.mark.parametrize("rules", ["iptables", "nft"])
def test_a_crash_removes_the_rules_logs_the_traceback_once_and_exits_1(
    node: Netns, tmp_path: Path, rules: str, where: str
) -> None:
    file = services(tmp_path / "services.json")
    trigger = tmp_path / "crash-now"
    process = node.popen(sys.executable, "-c", CRASHING, where, str(trigger),
                         "--services", str(file), "--rules", rules, *UPROXY_FLAGS,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: talk(node) == "pong")
        assert "default/web" in our_rules(node)
        trigger.touch()
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr
    assert stderr.count(f"injected failure in the {where}") == 2, stderr  # message + traceback
    assert stderr.count("Traceback (most recent call last)") == 1, stderr
    assert "CRITICAL" in stderr and "a bug" in stderr
    assert our_rules(node) == ""
    assert talk(node).startswith("error")
