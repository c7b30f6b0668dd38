"""The nft backend through libnftables in its own process, against the `nft` program.

`uproxy --rules nft` talks to the kernel through an in-process libnftables
context; the backend matrix (test_rules_backends.py) drives the `nft`
program from outside the namespace. Here a process inside a namespace runs
the in-process backend through a timeline (build, one-service changes with
a delta, a verify pass, a bad transaction), and after each step the
kernel's table must be exactly what the `nft` program path makes of the
same portals in a second namespace.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.conftest import Netns
from tests.system.topology import make_netns
from uproxy.model import Frontend, ServicePortName
from uproxy.rules.base import Portal
from uproxy.rules.nft import NftRules

pytestmark = pytest.mark.system

PREFIX = "UPI"
WEB = Frontend(ServicePortName("default", "web", "http", "TCP"), 80, "TCP",
               cluster_ips=("198.18.1.10",), node_port=30080,
               external_ips=("198.18.2.10",))
DNS = Frontend(ServicePortName("kube-system", "dns", "dns", "UDP"), 53, "UDP",
               cluster_ips=("198.18.1.53", "fd00:198::53"))
SIX = Frontend(ServicePortName("default", "six", "", "TCP"), 443, "TCP",
               cluster_ips=("fd00:198::10",))
PORTALS = [Portal(WEB, "0.0.0.0", 40001), Portal(DNS, "::", 40002), Portal(SIX, "::", 40003)]

# Steps, by index into PORTALS: (the list, how it differs from the previous one).
STEPS: list[tuple[list[int], list[int], list[int], bool]] = [
    ([0, 1, 2], [], [0, 1, 2], True),  # first apply: builds the tables
    ([0, 2], [1], [], False),  # a service goes (both families)
    ([0, 1, 2], [], [1], False),  # and comes back
    ([1], [0, 2], [], False),
    ([1], [], [], True),  # the periodic verify pass: nothing to send
]

DRIVER = """
import asyncio, json, subprocess, sys
from tests.system.test_nft_in_process import PORTALS, PREFIX, STEPS
from uproxy.rules.base import PortalDelta, RulesError
from uproxy.rules.nft import NftRules

async def main():
    rules = NftRules(PREFIX)
    assert rules.in_process
    out = []
    for picks, gone, new, verify in STEPS:
        delta = PortalDelta(tuple(PORTALS[i] for i in gone), tuple(PORTALS[i] for i in new))
        before = rules.transactions
        await rules.apply([PORTALS[i] for i in picks], verify=verify, delta=delta)
        ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
        out.append({"ruleset": ruleset.stdout, "sent": rules.transactions - before})
    try:
        await rules._send("add element ip upi portal_redirect { 1.2.3.4 . tcp . 1 : x }\\n")
    except RulesError as error:
        out.append({"error": str(error)})
    await rules.cleanup()
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    out.append({"ruleset": ruleset.stdout})
    print(json.dumps(out))

asyncio.run(main())
"""


def test_in_process_nft_matches_the_nft_program_step_by_step(netns: Netns) -> None:
    other = make_netns(f"{netns.name}-b")
    try:
        _compare(netns, other)
    finally:
        subprocess.run(["ip", "netns", "del", other.name], check=False)


def _compare(netns: Netns, other: Netns) -> None:
    result = netns.run(sys.executable, "-c", DRIVER, timeout=60)
    steps = json.loads(result.stdout)

    program = NftRules(PREFIX, command_prefix=["ip", "netns", "exec", other.name])
    assert not program.in_process
    for (picks, _, _, _), seen in zip(STEPS, steps, strict=False):
        asyncio.run(program.apply([PORTALS[i] for i in picks]))
        assert seen["ruleset"] == other.run("nft", "list", "ruleset").stdout
        assert "table ip upi" in seen["ruleset"] and "table ip6 upi" in seen["ruleset"]
    assert "198.18.1.10" in steps[0]["ruleset"] and "198.18.1.10" not in steps[3]["ruleset"]
    assert ("fd00:198::53" in steps[0]["ruleset"]) and ("fd00:198::53" not in steps[1]["ruleset"])
    assert steps[1]["sent"] == 2  # one small transaction per family, nothing rebuilt
    assert steps[4]["sent"] == 0  # verify pass: read back, found equal, nothing sent
    assert "line 1: add element ip upi portal_redirect" in steps[5]["error"]
    assert steps[6]["ruleset"].strip() == ""  # cleanup leaves nothing
