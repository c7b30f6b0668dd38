"""kill -9 in the middle of a large rules apply, then a restart: the kernel
ends up with exactly one copy of every rule, and SIGTERM leaves nothing.

The services file holds 5,000 services. With the iptables backends uproxy
is killed while its iptables-restore runs (which may go on to commit what
it was given, with nobody left to own it); with nft (libnftables in the
process, one transaction) the moment it holds a listener per service, which
it opens before it applies rules.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Netns, require_system
from tests.integration.apphelpers import Lines
from tests.reliability.conftest import open_fds, wait_for

pytestmark = pytest.mark.system

SERVICES = 5000


def _services(path: Path) -> None:
    path.write_text(json.dumps({"services": [
        {"name": f"s{i}", "clusterIP": f"198.18.{i // 250}.{i % 250 + 1}",
         "ports": [{"port": 80}], "endpoints": ["127.0.0.1"]}
        for i in range(SERVICES)]}))


def _portal_rules(ns: Netns, rules: str) -> Counter[str]:
    """Each portal rule (or map element) of uproxy's in the kernel, counted."""
    if rules == "nft":
        tables = ns.run("nft", "list", "tables").stdout.split("\n")
        assert tables.count("table ip uproxy") <= 1
        listing = ns.run("nft", "list", "map", "ip", "uproxy", "portal_redirect",
                         check=False).stdout
        return Counter(line.strip().rstrip(",") for line in listing.splitlines()
                       if 'comment "default/s' in line)
    tool = "iptables-legacy-save" if rules == "iptables-legacy" else "iptables-save"
    lines = ns.run(tool, "-t", "nat").stdout.splitlines()
    return Counter(line for line in lines if line.startswith(("-A UPROXY", "-A PREROUTING",
                                                              "-A OUTPUT")))


def _restoring(pid: int) -> bool:
    """Whether a child of `pid` is an iptables-restore (either variant)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return any(b"restore" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
                   for child in children)
    except OSError:
        return False


def _table_started(process: subprocess.Popen[str]) -> bool:
    """Whether the process has printed (its table, after the first sync)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 0)
    return bool(ready)


def _start(ns: Netns, services: Path, rules: str, path: str) -> subprocess.Popen[str]:
    backend = "iptables" if rules == "iptables-legacy" else rules
    return ns.popen("env", f"PATH={path}", sys.executable, "-m", "uproxy", "--services",
                    str(services), "--rules", backend, "--healthz-bind-address", "",
                    "--metrics-bind-address", "", "--shutdown-grace", "1s",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("rules", ["iptables", "iptables-legacy", "nft"])
def test_kill_9_during_a_large_apply_then_restart_leaves_one_copy(
    netns: Netns, tmp_path: Path, rules: str
) -> None:
    require_system("iptables", "nft", "iptables-legacy")
    import os

    path = os.environ.get("PATH", "")
    if rules == "iptables-legacy":
        from tests.system.topology import legacy_xtables_bin

        path = f"{legacy_xtables_bin(tmp_path / 'legacy-bin')}:{path}"
    services = tmp_path / "services.json"
    _services(services)

    first = _start(netns, services, rules, path)
    try:  # (ip netns exec and env exec: the pid is uproxy's)
        if rules == "nft":
            wait_for(lambda: first.poll() is not None or open_fds(first.pid) > SERVICES, 60,
                     "listeners to open")
        else:
            # A fast restore may come and go between two looks: then the rules
            # are in, and the kill comes right after the apply instead.
            wait_for(lambda: first.poll() is not None or _restoring(first.pid)
                     or _table_started(first), 60, "iptables-restore to run", interval=0.005)
        assert first.poll() is None
        first.kill()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(10)
    partial = _portal_rules(netns, rules)

    second = _start(netns, services, rules, path)
    try:
        # The table is printed after the first sync: its rules are in by then.
        output = Lines(second)
        wait_for(lambda: second.poll() is not None or len(output.lines) >= SERVICES, 120,
                 "the restarted uproxy's first sync")
        assert second.poll() is None
        found = _portal_rules(netns, rules)
        doubled = {line: count for line, count in found.items() if count > 1}
        assert not doubled, list(doubled.items())[:3]
        assert len([line for line in found if "default/s" in line]) == SERVICES
        if rules != "nft":  # one jump from each built-in chain
            jumps = [line for line in found if line.startswith(("-A PREROUTING", "-A OUTPUT"))]
            assert len(jumps) == 4, jumps
        print(f"{rules}: {sum('default/s' in line for line in partial)} portals when killed, "
              f"{SERVICES} after the restart, none doubled")
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr[-2000:]
    assert not [line for line in _portal_rules(netns, rules) if "default/s" in line]
