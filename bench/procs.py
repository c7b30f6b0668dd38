"""Process plumbing for the benchmark: start bounded, find the tree, read CPU and RSS.

Every process the harness starts gets its own session, so stopping it
(`Proc.stop`) signals exactly that process group and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class Proc:
    """A started process with its output going to a log file."""

    def __init__(self, argv: Sequence[str], log: Path, name: str) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Children (nginx workers, socat forks) may outlive the leader.
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=2)
        self._log_file.close()

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:] if line.strip())


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run(argv: Sequence[str], timeout: float,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run to completion, bounded in time; a timeout raises TimeoutError."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=check, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f}s") from exc


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_ticks(root: int) -> int:
    """utime+stime of the live tree, plus the reaped children's time the root holds.

    A forking proxy (socat) reaps its per-connection children, whose time then
    moves into the root's cutime/cstime: counting both keeps the sum monotonic.
    """
    total = 0
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3); utime is field 14 -> index 11.
        total += int(fields[11]) + int(fields[12])
        if pid == root:
            total += int(fields[13]) + int(fields[14])
    return total


def rss_bytes(root: int) -> int:
    """Resident set size summed over the tree (shared pages counted per process)."""
    total = 0
    for pid in tree(root):
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * PAGE
    return total


class CpuMeter:
    """Proxy CPU% over an interval: 100 means one core busy."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.t0 = time.monotonic()
        self.ticks0 = cpu_ticks(root) if root else 0

    def percent(self) -> float | None:
        if not self.root:
            return None
        seconds = time.monotonic() - self.t0
        return 100.0 * (cpu_ticks(self.root) - self.ticks0) / CLK_TCK / max(seconds, 1e-6)


def wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
