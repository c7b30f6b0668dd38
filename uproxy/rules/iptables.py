"""The `iptables` backend: our chains written by one iptables-restore per family.

A verifying apply (the periodic pass, the first apply of an instance, any
apply after a failure) reads the kernel (`iptables-save`), and when our
chains or the jumps into them differ from what they should be (a jump
missing, doubled, or no longer first, or last for the node ports, because
another program inserted or appended a rule), rewrites our
chains and fixes the jumps in one `iptables-restore --noflush -w`
transaction. An apply that carries changes (`verify=False`) trusts what this
instance last wrote: nothing is sent when the rules are the same, else one
restore that deletes the rules that went and appends the new ones (or
rewrites our chains when many changed). Nothing outside our chains and
jumps is touched, and a full pass after any failure or any hand edit puts
everything right again. Works with either iptables
variant: the host's `iptables-restore`, or `iptables-legacy-restore` with
`legacy=True`.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from uproxy.rules import command, privilege
from uproxy.rules.base import Portal, PortalDelta, RulesError
from uproxy.rules.render import (
    FAMILIES,
    Entry,
    Jump,
    chain_names,
    check_chain_prefix,
    iptables_chain_rules,
    jumps,
    portal_entries,
    render_iptables,
    render_restore,
)


@dataclass
class SavedTables:
    """What iptables-save printed, per table: chain names and `-A` lines."""

    chains: dict[str, set[str]] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def rules_of(self, table: str, chain: str) -> list[str]:
        head = f"-A {chain} "
        return [line[len(head):] for line in self.rules.get(table, []) if line.startswith(head)]


INCREMENTAL_MAX = 2000  # changed rules above which our chains are rewritten whole


def parse_save(text: str) -> SavedTables:
    saved = SavedTables()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            saved.chains.setdefault(table, set())
            saved.rules.setdefault(table, [])
        elif line.startswith(":") and table:
            saved.chains[table].add(line[1:].split()[0])
        elif line.startswith("-A ") and table:
            saved.rules[table].append(line)
    return saved


def jump_lines_in(saved: SavedTables, jump: Jump) -> list[str]:
    """The rule arguments of every rule in the built-in chain that jumps to our chain."""
    pattern = re.compile(rf"(^|\s)-j {re.escape(jump.target)}(\s|$)")
    return [args for args in saved.rules_of(jump.table, jump.chain) if pattern.search(args)]


def jump_fixes(saved: SavedTables, prefix: str) -> dict[str, list[str]]:
    """Per table, the -I/-A/-D lines that leave exactly one jump into each of our
    chains, in its place: first in its built-in chain, or last for the node ports.

    Nothing when every jump is alone and in place. A jump that another program
    pushed away from its place (a rule inserted before it, or appended after a
    "last" one) is deleted and put back. Deletes go by rule text, never by
    number, so a chain that changes between the save and the restore makes the
    transaction fail rather than delete someone else's rule.
    """
    fixes: dict[str, list[str]] = {}
    for jump in jumps(prefix):
        rules = saved.rules_of(jump.table, jump.chain)
        found = jump_lines_in(saved, jump)
        lines = fixes.setdefault(jump.table, [])
        edge = (rules[0] if jump.first else rules[-1]) if rules else None
        others = list(found)
        if edge is not None and edge in found:
            others.remove(edge)
        if edge in found and edge not in others and edge == jump.spec:
            # In place: only duplicates elsewhere go (their text differs from the
            # kept one, so deleting by text cannot hit it).
            lines += [f"-D {jump.chain} {extra}" for extra in others]
            continue
        lines += [f"-D {jump.chain} {args}" for args in found]
        lines.append(f"-I {jump.chain} 1 {jump.spec}" if jump.first
                     else f"-A {jump.chain} {jump.spec}")
    return {table: lines for table, lines in fixes.items() if lines}


class IptablesRules:
    name = "iptables"

    def __init__(
        self,
        chain_prefix: str = "UPROXY",
        *,
        command_prefix: Sequence[str] = (),
        legacy: bool = False,
        families: Sequence[int] = FAMILIES,
    ) -> None:
        self.prefix = check_chain_prefix(chain_prefix)
        self.command_prefix = tuple(command_prefix)
        variant = "-legacy" if legacy else ""
        self.tools = {
            4: (f"iptables{variant}-save", f"iptables{variant}-restore"),
            6: (f"ip6tables{variant}-save", f"ip6tables{variant}-restore"),
        }
        self.families = tuple(families)
        self.legacy = legacy
        self.restores = 0  # transactions sent, for tests and metrics
        self._save_per_table = False  # legacy xtables without root: `-t TABLE` each
        # Per family, our chains' rules as this instance last left them (None:
        # it made no chains there); emptied by a failure, so that the next
        # apply reads the kernel.
        self._applied: dict[int, dict[str, list[str]] | None] = {}

    def render(self, portals: Sequence[Portal]) -> str:
        return render_iptables(portals, self.prefix)

    async def preflight(self) -> list[str]:
        save = self.tools[self.families[0]][0]
        version = await command.run([*self.command_prefix, save, "--version"])
        privilege.check_rules_privilege(
            f"--rules {self.name}", runs_tools=True,
            takes_xtables_lock=self.legacy or "legacy" in version.stdout)
        result = await command.run([*self.command_prefix, save, "-t", "nat"])
        if result.returncode != 0:
            raise RulesError(f"--rules {self.name}: {save} -t nat failed: "
                             f"{command.first_line(result.stderr)}")
        return []

    async def _save(self, family: int) -> SavedTables | None:
        """The kernel's tables, or None when this family has no iptables here."""
        save, _ = self.tools[family]
        texts: list[str] = []
        if not self._save_per_table:
            result = await command.run([*self.command_prefix, save])
            if result.returncode == 0:
                texts.append(result.stdout)
            elif "tables_names" in result.stderr:
                # Legacy xtables list their tables in a file only root may read
                # (/proc/net/ip_tables_names); named one by one, they need only
                # CAP_NET_ADMIN and CAP_NET_RAW.
                self._save_per_table = True
            else:
                return None
        if self._save_per_table:
            for table in chain_names(self.prefix):
                result = await command.run([*self.command_prefix, save, "-t", table])
                if result.returncode != 0:
                    return None
                texts.append(result.stdout)
        return await asyncio.to_thread(parse_save, "".join(texts))  # 20k lines at 10k services

    async def _restore(self, family: int, text: str) -> None:
        _, restore = self.tools[family]
        result = await command.run([*self.command_prefix, restore, "--noflush", "-w"], text)
        self.restores += 1
        if result.returncode != 0:
            raise RulesError(f"{restore}: {command.failing_line(result.stderr, text)}")

    def _ours_exist(self, saved: SavedTables) -> bool:
        return any(chain in saved.chains.get(table, set())
                   for table, chains in chain_names(self.prefix).items() for chain in chains)

    def _in_place(self, saved: SavedTables, wanted: dict[str, list[str]]) -> bool:
        # Order does not matter: no two of our rules in a chain match the same
        # packet, and an incremental change appends where a full write sorts.
        for table, chains in chain_names(self.prefix).items():
            for chain in chains:
                if chain not in saved.chains.get(table, set()):
                    return False
                if sorted(saved.rules_of(table, chain)) != sorted(wanted[chain]):
                    return False
        return True

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        if (not verify and delta is not None and delta.empty
                and all(family in self._applied for family in self.families)):
            # The very portals of the last apply, which succeeded: a sync that
            # changed only endpoints renders nothing (200 ms of Python at 10k).
            return
        # A verifying pass renders every portal: ~0.1 s at 10k, off the loop.
        entries = (await asyncio.to_thread(portal_entries, portals) if verify
                   else portal_entries(portals))
        try:
            for family in self.families:
                mine = [e for e in entries if e.family == family]
                trusted = family in self._applied
                last = self._applied.pop(family, None)
                if trusted and not verify and (last is not None or not mine):
                    self._applied[family] = await self._send_difference(family, mine, last)
                else:
                    self._applied[family] = await self._verify(family, mine)
        except RulesError:
            self._applied.clear()  # next time: read the kernel, trust nothing
            raise

    async def _verify(self, family: int, mine: list[Entry]) -> dict[str, list[str]] | None:
        """Read the kernel, repair our chains and jumps; what our chains hold after."""
        saved = await self._save(family)
        if saved is None:
            if mine:
                raise RulesError(f"{self.tools[family][0]} failed: no IPv{family} iptables")
            return None
        if not mine and not self._ours_exist(saved):
            return None  # nothing wanted, nothing there: leave this family alone
        wanted, fixes, in_place = await asyncio.to_thread(self._compare, saved, mine)
        if fixes or not in_place:
            await self._restore(family, render_restore(mine, self.prefix, fixes, wanted))
        return wanted

    def _compare(self, saved: SavedTables, mine: list[Entry],
                 ) -> tuple[dict[str, list[str]], dict[str, list[str]], bool]:
        """(our chains' wanted rules, jump fixes, whether the chains hold them): pure
        work over every rule, run in a worker thread."""
        wanted = iptables_chain_rules(mine, self.prefix)
        return wanted, jump_fixes(saved, self.prefix), self._in_place(saved, wanted)

    async def _send_difference(self, family: int, mine: list[Entry],
                               last: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        """Without reading the kernel: change our chains from `last` to `mine`."""
        if last is None:
            return None  # nothing wanted, nothing made (the caller checked)
        wanted = iptables_chain_rules(mine, self.prefix)
        if wanted == last:
            return wanted
        lines: dict[str, list[str]] = {}
        changed = 0
        for table, chains in chain_names(self.prefix).items():
            body = lines.setdefault(table, [])
            for chain in chains:
                before, after = Counter(last.get(chain, [])), Counter(wanted[chain])
                gone, new = before - after, after - before
                body += [f"-D {chain} {args}" for args in sorted(gone.elements())]
                body += [f"-A {chain} {args}" for args in sorted(new.elements())]
            changed += len(body)
        if changed > INCREMENTAL_MAX:
            # Many changes: rewriting our chains is faster than finding each rule.
            await self._restore(family, render_restore(mine, self.prefix, {}, wanted))
        else:
            await self._restore(family, "".join(
                f"*{table}\n" + "".join(f"{line}\n" for line in body) + "COMMIT\n"
                for table, body in lines.items() if body))
        return wanted

    async def remove_all(self) -> list[str]:
        """Remove our jumps and chains; says what was removed."""
        removed: list[str] = []
        for family in self.families:
            saved = await self._save(family)
            if saved is None:
                continue
            lines: dict[str, list[str]] = {}
            for jump in jumps(self.prefix):
                for args in jump_lines_in(saved, jump):
                    lines.setdefault(jump.table, []).append(f"-D {jump.chain} {args}")
                    removed.append(f"{self.tools[family][1]}: jump {jump.chain} -> {jump.target}")
            for table, chains in chain_names(self.prefix).items():
                present = [c for c in chains if c in saved.chains.get(table, set())]
                for chain in present:
                    lines.setdefault(table, []).append(f":{chain} - [0:0]")
                    removed.append(f"{self.tools[family][1]}: chain {table} {chain}")
                lines.setdefault(table, []).extend(f"-X {chain}" for chain in present)
            text = "".join(
                f"*{table}\n" + "".join(f"{line}\n" for line in body) + "COMMIT\n"
                for table, body in lines.items() if body
            )
            self._applied.pop(family, None)
            if text:
                # declarations first in each table: a chain is flushed before -X
                await self._restore(family, _declarations_first(text))
        return removed

    async def cleanup(self) -> None:
        await self.remove_all()


def _declarations_first(text: str) -> str:
    """Within each table block, put `:CHAIN` lines right after `*table` (restore's grammar)."""
    out: list[str] = []
    block: list[str] = []
    for line in text.splitlines():
        if line.startswith("*"):
            out.append(line)
            block = []
        elif line == "COMMIT":
            out += [b for b in block if b.startswith(":")]
            out += [b for b in block if not b.startswith(":")]
            out.append(line)
        else:
            block.append(line)
    return "\n".join(out) + "\n"
