"""The `iptc` backend: the same rules as `iptables` (render's text), written with python-iptables.

For hosts on legacy xtables only: libiptc edits the legacy tables, which an
nf_tables-variant `iptables` neither shows nor honours in the same way, so
on such a host the backend refuses to start. libiptc calls block and are not
thread-safe: they run in a worker thread, one at a time under one lock, and
hold the xtables lock (the file `iptables -w` waits on) while they work.
libxtables registers an extension (REDIRECT, DNAT) for the first address
family that loads it only, so one process cannot build both IPv4 and IPv6
rules with python-iptables: IPv6 rules go through `ip6tables-legacy-restore`
(the `iptables` backend, IPv6 only), the same chains in the same tables.
Each table is committed as one transaction (libiptc replaces the table
atomically), so a failure leaves the previous rules in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from uproxy.rules import privilege
from uproxy.rules.base import Portal, PortalDelta, RulesError
from uproxy.rules.iptables import IptablesRules
from uproxy.rules.render import (
    Entry,
    chain_names,
    check_chain_prefix,
    iptables_chain_rules,
    jumps,
    portal_entries,
    render_iptables,
)

XTABLES_LOCK_TIMEOUT = 10.0  # seconds, like `iptables -w 10`
_LIBIPTC = threading.Lock()  # one libiptc user per process


class IptcUnavailable(RulesError):
    """python-iptables cannot be used on this host."""


def iptc_unavailable(iptables_cmd: str = "iptables") -> str | None:
    """Why the iptc backend cannot run here (one line), or None."""
    try:
        version = subprocess.run([iptables_cmd, "--version"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout.strip()
    except FileNotFoundError:
        return f"--rules iptc: {iptables_cmd!r} not found; cannot tell the xtables variant"
    if "nf_tables" in version:
        return (f"--rules iptc: this host's iptables is the nf_tables variant ({version}); "
                "python-iptables only edits legacy xtables: use --rules iptables or nft")
    try:
        import iptc  # noqa: F401
    except Exception as error:  # ImportError, or OSError from a missing libiptc
        return f"--rules iptc: python-iptables cannot load: {error}"
    return None


@contextlib.contextmanager
def xtables_lock(timeout: float = XTABLES_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock that iptables and iptables-restore take with -w."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    # Read-only, as iptables opens it: a non-root user needs only read access.
    fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RulesError(f"xtables lock {path} held for {timeout:g}s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # also releases the flock


def rule_from_args(iptc: Any, family: int, args: str) -> Any:
    """A python-iptables rule from the very text render writes for iptables
    (`-p tcp -m conntrack --ctstate DNAT ... -j ACCEPT`), so both backends
    install one set of rules from one description."""
    rule = iptc.Rule() if family == 4 else iptc.Rule6()
    tokens = shlex.split(args)
    if len(tokens) % 2:
        raise RulesError(f"iptc: rule text without a value at its end: {args}")
    part: Any = None  # the match or target that the next --options belong to
    for option, value in zip(tokens[::2], tokens[1::2], strict=True):
        if option == "-p":
            rule.protocol = value
        elif option == "-d":
            rule.dst = value
        elif option == "-m":
            part = rule.create_match(value)
        elif option == "-j":
            part = rule.create_target(value)
        elif option.startswith("--") and part is not None:
            part.set_parameter(option[2:], value)
        else:
            raise RulesError(f"iptc: {option!r} is not understood in: {args}")
    return rule


class IptcRules:
    name = "iptc"

    def __init__(self, chain_prefix: str = "UPROXY", *, iptables_cmd: str = "iptables",
                 check_host: bool = True) -> None:
        """`check_host=False`: only to render (`uproxy explain`), on any host."""
        self.prefix = check_chain_prefix(chain_prefix)
        if check_host:
            # libiptc takes the xtables lock; IPv6 goes through ip6tables-legacy-restore.
            privilege.check_rules_privilege(f"--rules {self.name}", runs_tools=True,
                                            takes_xtables_lock=True)
        reason = iptc_unavailable(iptables_cmd) if check_host else None
        if reason is not None:
            raise IptcUnavailable(reason)
        self.commits = 0
        self._last: list[Entry] | None = None  # IPv4 entries of the last successful apply
        legacy = shutil.which("ip6tables-legacy-restore") is not None
        self.ipv6 = IptablesRules(chain_prefix, legacy=legacy, families=(6,))

    async def preflight(self) -> list[str]:
        return []  # checked when made: loading libiptc without the privilege fails obscurely

    def render(self, portals: Sequence[Portal]) -> str:
        """The same rules as the iptables backend; IPv4 is written by libiptc."""
        return render_iptables(portals, self.prefix).replace(
            "# iptables-restore --noflush -w\n",
            "# IPv4: libiptc (python-iptables), one commit per table, these rules\n", 1)

    @staticmethod
    def _table(iptc: Any, family: int, name: str) -> Any:
        table = iptc.Table(name) if family == 4 else iptc.Table6(name)
        table.autocommit = False
        table.refresh()
        return table

    def _ours_present(self, iptc: Any, family: int) -> bool:
        for table_name, chains in chain_names(self.prefix).items():
            table = self._table(iptc, family, table_name)
            if any(table.is_chain(chain) for chain in chains):
                return True
        return False

    def _apply_family(self, iptc: Any, family: int, entries: list[Entry]) -> None:
        if not entries and not self._ours_present(iptc, family):
            return
        names = chain_names(self.prefix)
        wanted = iptables_chain_rules(entries, self.prefix)
        for table_name, chains in names.items():
            table = self._table(iptc, family, table_name)
            try:
                made = {name: (iptc.Chain(table, name) if table.is_chain(name)
                               else table.create_chain(name)) for name in chains}
                for chain in made.values():
                    chain.flush()
                for chain_name, chain in made.items():  # after all exist: a HOST chain jumps
                    for args in wanted[chain_name]:
                        chain.append_rule(rule_from_args(iptc, family, args))
                for jump in jumps(self.prefix):
                    if jump.table != table_name:
                        continue
                    builtin = iptc.Chain(table, jump.chain)
                    rules = builtin.rules
                    at = [i for i, r in enumerate(rules) if r.target.name == jump.target]
                    shaped = all(any(m.name == "conntrack" for m in rules[i].matches)
                                 == jump.new_only for i in at)
                    if at == [0 if jump.first else len(rules) - 1] and shaped:
                        continue  # alone, in place (first, or last for node ports), as made
                    # Missing, doubled, or pushed away by another program's rule:
                    # every copy goes and one comes back in its place.
                    for index in reversed(at):
                        builtin.delete_rule(rules[index])
                    rule = rule_from_args(iptc, family, jump.spec)
                    if jump.first:
                        builtin.insert_rule(rule)
                    else:
                        builtin.append_rule(rule)
                table.commit()
                self.commits += 1
            except iptc.IPTCError as error:
                table.refresh()  # drop the uncommitted changes
                raise RulesError(f"iptc IPv{family} {table_name}: {error}") from error

    def _remove_family(self, iptc: Any, family: int) -> list[str]:
        removed = []
        for table_name, chains in chain_names(self.prefix).items():
            table = self._table(iptc, family, table_name)
            present = [c for c in chains if table.is_chain(c)]
            touched = False
            for jump in jumps(self.prefix):
                if jump.table != table_name:
                    continue
                builtin = iptc.Chain(table, jump.chain)
                for rule in [r for r in builtin.rules if r.target.name == jump.target]:
                    builtin.delete_rule(rule)
                    removed.append(f"iptc IPv{family}: jump {jump.chain} -> {jump.target}")
                    touched = True
            for chain_name in present:  # all flushed first: a HOST chain jumps to a CONTAINER one
                iptc.Chain(table, chain_name).flush()
            for chain_name in present:
                table.delete_chain(chain_name)
                removed.append(f"iptc IPv{family}: chain {table_name} {chain_name}")
                touched = True
            if touched:
                table.commit()
        return removed

    def _apply_sync(self, entries: list[Entry]) -> None:
        import iptc

        with _LIBIPTC, xtables_lock():
            self._apply_family(iptc, 4, [e for e in entries if e.family == 4])

    def _remove_sync(self) -> list[str]:
        import iptc

        removed: list[str] = []
        with _LIBIPTC, xtables_lock():
            removed += self._remove_family(iptc, 4)
        return removed

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        """libiptc rewrites a whole table per commit, so there is no smaller
        change to send: verify=False only skips an apply that changes nothing."""
        unchanged = not verify and delta is not None and delta.empty
        if not (unchanged and self._last is not None):
            entries = [e for e in portal_entries(portals) if e.family == 4]
            if verify or entries != self._last:
                self._last = None
                await asyncio.to_thread(self._apply_sync, entries)
                self._last = entries
        await self.ipv6.apply(portals, verify=verify, delta=delta)

    async def remove_all(self) -> list[str]:
        self._last = None
        removed = await asyncio.to_thread(self._remove_sync)
        return removed + await self.ipv6.remove_all()

    async def cleanup(self) -> None:
        await self.remove_all()
