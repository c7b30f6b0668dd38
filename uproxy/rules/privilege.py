"""What rules mode needs from the kernel, checked once at start.

Rules mode needs CAP_NET_ADMIN (and CAP_NET_BIND_SERVICE only for listeners
below port 1024); it does not need uid 0. Two things make that less simple
than it sounds, and both are handled here rather than left to fail later as a
tool's cryptic complaint on every sync:

- A process that is not uid 0 loses its capabilities when it runs another
  program, unless they are in its *ambient* set. The iptables backend runs
  iptables-restore; the nft backend runs `nft` when libnftables cannot be
  loaded. So at start, uproxy makes the capabilities it holds ambient
  (which needs them in the inheritable set first; a process may add to that
  set what it already has in its permitted set).
- Legacy xtables (iptables-legacy, python-iptables) talk to the kernel
  through a raw socket, so they also need CAP_NET_RAW (measured: without it
  `iptables-legacy -t nat -S` says "Permission denied (you must be root)",
  for uid 0 too), and they take the xtables lock file, which iptables makes
  root's with mode 0600. iptables opens it read-only, so a non-root uid needs
  to be able to read it (or, when it is missing, to create it).

Python has no binding for capget/capset, and the maintained libcap-ng binding
is not on PyPI; the two syscalls are declared with ctypes below (as libnft's
few calls are).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path

from uproxy.rules.base import RulesError

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
             CAP_NET_RAW: "CAP_NET_RAW"}

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2

XTABLES_LOCK = Path("/run/xtables.lock")
HOW_TO_GRANT = "see README, Least privilege"


class PrivilegeError(RulesError):
    """Rules mode cannot work with the privileges this process has; one line."""


@dataclass(frozen=True, slots=True)
class CapSets:
    """The capability sets of a process, as bit masks (/proc/PID/status)."""

    inheritable: int = 0
    permitted: int = 0
    effective: int = 0
    ambient: int = 0

    def has(self, cap: int, which: str = "effective") -> bool:
        mask: int = getattr(self, which)
        return bool(mask >> cap & 1)


def parse_status(text: str) -> CapSets:
    """CapSets from the text of /proc/PID/status (pure)."""
    fields = {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            fields[key] = int(value.strip(), 16)
    return CapSets(fields["CapInh"], fields["CapPrm"], fields["CapEff"], fields["CapAmb"])


def current() -> CapSets:
    return parse_status(Path("/proc/self/status").read_text())


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def make_ambient(cap: int) -> bool:
    """Put a permitted capability into the inheritable and ambient sets, so
    programs this process runs start with it. Whether it is ambient now."""
    if current().has(cap, "ambient"):
        return True
    if not current().has(cap, "permitted"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return False
    data[cap // 32].inheritable |= 1 << (cap % 32)
    if libc.capset(ctypes.byref(header), data) != 0:
        return False
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
        return False
    return current().has(cap, "ambient")


def check_rules_privilege(flag: str, *, runs_tools: bool, takes_xtables_lock: bool,
                          uid: int | None = None, caps: CapSets | None = None,
                          lock: Path = XTABLES_LOCK) -> None:
    """Raise PrivilegeError (one line) unless what `flag` asks for can work here.

    `runs_tools`: the backend runs iptables-restore or nft as child
    processes, which must inherit its capabilities. `takes_xtables_lock`: it
    (or its tools) use legacy xtables, which need CAP_NET_RAW as well and
    open the xtables lock file.
    """
    uid = os.geteuid() if uid is None else uid
    caps = current() if caps is None else caps
    if not caps.has(CAP_NET_ADMIN):
        raise PrivilegeError(
            f"{flag}: needs CAP_NET_ADMIN to write kernel rules, and this process does not "
            f"have it: run as root or grant CAP_NET_ADMIN ({HOW_TO_GRANT})")
    needed = [CAP_NET_ADMIN]
    if takes_xtables_lock:
        needed.append(CAP_NET_RAW)
        if not caps.has(CAP_NET_RAW):
            raise PrivilegeError(
                f"{flag}: legacy xtables need CAP_NET_RAW besides CAP_NET_ADMIN (libiptc "
                f"uses a raw socket), and this process does not have it: grant both "
                f"({HOW_TO_GRANT})")
    for cap in needed:
        if uid != 0 and runs_tools and not make_ambient(cap):
            raise PrivilegeError(
                f"{flag}: has {CAP_NAMES[cap]} but cannot pass it to the rule tools it runs "
                f"(uid {uid} is not root and the capability cannot be made ambient): grant "
                f"{CAP_NAMES[cap]} as an ambient capability ({HOW_TO_GRANT})")
    if uid != 0 and takes_xtables_lock and not _lock_usable(lock):
        raise PrivilegeError(
            f"{flag}: legacy iptables takes the lock {lock}, which uid {uid} cannot "
            f"{'read' if lock.exists() else 'create'}: let this uid read it (e.g. "
            f"systemd-tmpfiles `f {lock} 0640 root GROUP`), or run as uid 0 with only "
            f"CAP_NET_ADMIN and CAP_NET_RAW ({HOW_TO_GRANT})")


def _lock_usable(lock: Path) -> bool:
    """Whether the lock opens as iptables opens it: read-only, made when missing."""
    if lock.exists():
        return os.access(lock, os.R_OK)
    return os.access(lock.parent, os.W_OK | os.X_OK)
