"""Shared test fixtures.

System tests need root and network namespaces. Run unprivileged they skip
with the reason; with UPROXY_REQUIRE_SYSTEM=1 (as CI sets) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_SYSTEM = os.environ.get("UPROXY_REQUIRE_SYSTEM") == "1"


def system_unavailable(*tools: str) -> str | None:
    """Why system tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and kernel rules)"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


def require_system(*tools: str) -> None:
    reason = system_unavailable(*tools)
    if reason is None:
        return
    if REQUIRE_SYSTEM:
        pytest.fail(f"UPROXY_REQUIRE_SYSTEM=1 but {reason}")
    pytest.skip(reason)


class Netns:
    """A network namespace made for one test, removed afterwards."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            check=check, capture_output=True, text=True, input=input, timeout=timeout,
        )

    def popen(self, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh namespace with loopback up."""
    require_system()
    name = f"uproxy-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """A folder for a test's artefacts (screenshots, logs), kept after the run."""
    path = Path(__file__).parent.parent / "test-output" / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path
