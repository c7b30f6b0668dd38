"""The `nft` backend: one native table per family, services as map elements.

`table ip uproxy` (and `ip6`) holds fixed chains that look the destination
up in maps keyed by `daddr . l4proto . dport`; a service is a few map
elements.

- A sync that carries changes (`verify=False`) after a successful apply
  sends only the element difference from what this instance last applied,
  in one small `nft -f` transaction, without reading the kernel; only the
  portals that changed are rendered again (`ElementIndex`).
- The first apply of an instance (and any apply after a failure) replaces
  the whole table in one transaction: whatever a crashed run left is
  replaced, never read or duplicated.
- The periodic pass (`verify=True`) reads the table back (`nft -n -j list
  table`, numeric: about half the time of the named listing), and when its
  chains and maps are what we built sends the element difference, else
  replaces the whole table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from uproxy.rules import command, libnft, privilege
from uproxy.rules.base import Portal, PortalDelta, RulesError
from uproxy.rules.render import (
    FAMILIES,
    NFT_MAPS,
    NFT_SET,
    ElementIndex,
    ItemKey,
    check_chain_prefix,
    nft_family,
    nft_table_name,
    render_nft,
    render_nft_diff,
    render_nft_skeleton,
    render_nft_table_of,
)

Elements = dict[str, dict[str, str]]
_PROTOCOLS = {6: "tcp", 17: "udp"}  # what `nft -n` prints as numbers


def _key_text(key: Any) -> str:
    """Element key text as we render it; the l4proto (second to last) by name."""
    if type(key) is dict and "concat" in key:
        parts = key["concat"]
        if len(parts) >= 2 and type(parts[-2]) is int:
            parts = [*parts[:-2], _PROTOCOLS.get(parts[-2], parts[-2]), parts[-1]]
        return " . ".join(map(str, parts))
    return str(key)


def _value_text(value: Any) -> str:
    if type(value) is dict and "concat" in value:
        return " . ".join(map(str, value["concat"]))
    return str(value)


def parse_table(listing: dict[str, Any]) -> tuple[str, Elements]:
    """(skeleton, elements) of one table from `nft [-n] -j list table`.

    The skeleton is everything but handles and elements: two listings with
    equal skeletons have the same chains, rules and map types.
    """
    skeleton: list[Any] = []
    elements: Elements = {}
    for item in listing.get("nftables", []):
        for kind in ("chain", "rule", "map", "set"):
            if kind not in item:
                continue
            body = dict(item[kind])
            body.pop("handle", None)
            found = body.pop("elem", [])
            skeleton.append([kind, body])
            if kind == "map":
                texts = elements.setdefault(body["name"], {})
                for key, value in found:
                    comment = None
                    if isinstance(key, dict) and "elem" in key:
                        comment = key["elem"].get("comment")
                        key = key["elem"]["val"]
                    key_text = _key_text(key)
                    note = f' comment "{comment}"' if comment is not None else ""
                    texts[key_text] = f"{key_text}{note} : {_value_text(value)}"
            elif kind == "set":
                texts = elements.setdefault(body["name"], {})
                for key in found:
                    if isinstance(key, dict) and "elem" in key:
                        key = key["elem"]["val"]
                    texts[_key_text(key)] = _key_text(key)
    return json.dumps(skeleton, sort_keys=True), elements


Shape = tuple[tuple[str, ...], ...]

_CHAIN = re.compile(r"^\s*chain (\S+) \{")
_HOOK = re.compile(r"^\s*type (\S+) hook (\S+) priority (-?\d+); policy (\S+);")
_COLLECTION = re.compile(r"^\s*(map|set) (\S+) \{")


def expected_shape(prefix: str, family: int) -> Shape:
    """Chains (with hook, priority and rule count) and maps the rendered table has."""
    shape: list[tuple[str, ...]] = []
    chain: list[str] | None = None
    rules = 0
    for line in render_nft_skeleton(prefix, family):
        if found := _COLLECTION.match(line):
            shape.append((found.group(1), found.group(2)))
        elif found := _CHAIN.match(line):
            chain, rules = [found.group(1)], 0
        elif chain is not None and (found := _HOOK.match(line)):
            chain += list(found.groups())
        elif chain is not None and line.strip() == "}":
            shape.append(("chain", *chain, str(rules)))
            chain = None
        elif chain is not None and line.strip():
            rules += 1
    return tuple(sorted(shape))


def listed_shape(listing: dict[str, Any]) -> Shape:
    """The same facts from `nft -j list table`."""
    shape: list[tuple[str, ...]] = []
    rules: dict[str, int] = {}
    for item in listing.get("nftables", []):
        if "rule" in item:
            chain = item["rule"]["chain"]
            rules[chain] = rules.get(chain, 0) + 1
    for item in listing.get("nftables", []):
        if "map" in item or "set" in item:
            kind = "map" if "map" in item else "set"
            shape.append((kind, item[kind]["name"]))
        elif "chain" in item:
            c = item["chain"]
            shape.append(("chain", c["name"], str(c.get("type")), str(c.get("hook")),
                          str(c.get("prio")), str(c.get("policy")),
                          str(rules.get(c["name"], 0))))
    return tuple(sorted(shape))


def input_drop_warnings(listing: dict[str, Any], ours: str,
                        last_rules: dict[tuple[str, str, str], dict[str, Any]] | None = None,
                        ) -> list[str]:
    """Warnings for base chains of other tables on the input hook that drop what
    they did not accept (`nft -j list chains`; iptables-nft's filter INPUT is
    one of them): by policy, or by a last rule that drops or rejects every
    packet reaching it (firewalld's way). `last_rules` holds `nft -j list
    chain` of the chains with policy accept, by (family, table, chain).

    Every base chain on a hook sees the packet and a drop in any of them is
    final, so uproxy's own accept of redirected traffic cannot let it
    through such a firewall: the firewall itself must accept it.
    """
    warnings = []
    for chain in input_chains(listing, ours):
        key = (chain["family"], chain["table"], chain["name"])
        if chain.get("policy") == "drop":
            why = "drops input by default (policy drop)"
        elif (verdict := final_verdict((last_rules or {}).get(key, {}))) is not None:
            why = f"ends in a rule that {verdict}s all input"
        else:
            continue
        where = f"table {chain['family']} {chain['table']} chain {chain['name']}"
        warnings.append(
            f"--rules nft: {where} {why}, and an accept in "
            f"uproxy's table cannot override it: redirected service traffic will be dropped "
            f"unless that chain accepts it, e.g. `nft insert rule {chain['family']} "
            f"{chain['table']} {chain['name']} ct status dnat accept` (iptables: "
            f"`iptables -I INPUT -m conntrack --ctstate DNAT -j ACCEPT`)")
    return warnings


def input_chains(listing: dict[str, Any], ours: str) -> list[dict[str, Any]]:
    """Base chains on the input hook of other tables (`nft -j list chains`)."""
    return [item["chain"] for item in listing.get("nftables", [])
            if isinstance(item.get("chain"), dict) and item["chain"].get("hook") == "input"
            and item["chain"].get("table") != ours
            and item["chain"].get("family") in ("ip", "ip6", "inet")]


_QUIET = {"counter", "log", "limit"}  # statements that do not make a rule conditional


def final_verdict(listing: dict[str, Any]) -> str | None:
    """'drop' or 'reject' when a chain's last rule (`nft -j list chain`) drops
    every packet that reaches it (no match before the verdict), else None."""
    rules = [item["rule"] for item in listing.get("nftables", []) if "rule" in item]
    if not rules:
        return None
    verdict = None
    for statement in rules[-1].get("expr", []):
        (kind, body), = statement.items()
        if kind in _QUIET:
            continue
        if kind in ("drop", "reject"):
            verdict = kind
        elif kind == "xt" and isinstance(body, dict) and body.get("name") in ("DROP", "REJECT"):
            verdict = str(body["name"]).lower()  # iptables-nft's -j DROP / -j REJECT
        else:
            return None  # a match: the rule drops only some packets
    return verdict


class NftRules:
    name = "nft"

    def __init__(self, chain_prefix: str = "UPROXY", *,
                 command_prefix: Sequence[str] = (),
                 in_process: bool | None = None) -> None:
        """`in_process`: talk to the kernel through libnftables in this process
        (None: when the library loads and no `command_prefix` is given), else
        run the `nft` program (after `command_prefix`, e.g. `ip netns exec NS`)."""
        self.prefix = check_chain_prefix(chain_prefix)
        self.table = nft_table_name(self.prefix)
        self.command_prefix = tuple(command_prefix)
        if in_process is None:
            in_process = not self.command_prefix and libnft.library() is not None
        self._lib = libnft.LibNft(libnft.library()) if in_process else None
        # Per family, the elements this instance last applied, or None when it
        # left the family without a table (nothing wanted). Emptied by a failure.
        self._applied: dict[int, Elements | None] = {}
        # Per family, the skeleton of the table we built, learned on the
        # first verify pass whose listing has the rendered shape.
        self._skeleton: dict[int, str] = {}
        self._index = ElementIndex()  # the wanted elements, rendered portal by portal
        self.transactions = 0  # nft -f runs, for tests and metrics
        self.full_builds = 0
        self.reads = 0  # nft list table runs

    def render(self, portals: Sequence[Portal]) -> str:
        return render_nft(portals, self.prefix)

    async def preflight(self) -> list[str]:
        privilege.check_rules_privilege(f"--rules {self.name}", runs_tools=not self.in_process,
                                        takes_xtables_lock=False)
        result = await self._nft("list chains\n", listing=True)
        if result.returncode != 0:
            raise RulesError(f"--rules nft: nft list chains failed: "
                             f"{command.first_line(result.stderr)}")
        try:
            listing = json.loads(result.stdout)
        except ValueError as error:
            raise RulesError(f"nft list chains: unreadable JSON: {error}") from error
        last_rules = {}
        for chain in input_chains(listing, self.table):
            if chain.get("policy") == "drop":
                continue
            key = (chain["family"], chain["table"], chain["name"])
            rules = await self._nft(f"list chain {' '.join(key)}\n", listing=True)
            if rules.returncode == 0:
                with contextlib.suppress(ValueError):
                    last_rules[key] = json.loads(rules.stdout)
        return input_drop_warnings(listing, self.table, last_rules)

    @property
    def in_process(self) -> bool:
        return self._lib is not None

    async def _nft(self, text: str, *, listing: bool = False) -> command.Result:
        """Run `nft -f` input; `listing`: numeric JSON output (`nft -n -j`)."""
        if self._lib is not None:
            flags = libnft.OUTPUT_JSON | libnft.OUTPUT_NUMERIC_ALL if listing else 0
            return await self._lib.run(text, flags=flags)
        if listing:  # `nft -j -f` would read JSON: the command goes on the command line
            return await command.run([*self.command_prefix, "nft", "-n", "-j", *text.split()])
        return await command.run([*self.command_prefix, "nft", "-f", "-"], text)

    async def _send(self, text: str) -> None:
        result = await self._nft(text)
        self.transactions += 1
        if result.returncode != 0:
            raise RulesError(f"nft -f: {command.failing_line(result.stderr, text)}")

    async def _tables(self) -> set[int]:
        """Families that have our table now (`nft list tables` is cheap)."""
        result = await self._nft("list tables\n")
        if result.returncode != 0:
            raise RulesError(f"nft list tables: {result.stderr.strip()}")
        found = set()
        for line in result.stdout.splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "table" and words[2] == self.table:
                found |= {f for f in FAMILIES if nft_family(f) == words[1]}
        return found

    async def _read(self, family: int) -> dict[str, Any] | None:
        """The table's listing, or None when it does not exist."""
        result = await self._nft(f"list table {nft_family(family)} {self.table}\n", listing=True)
        self.reads += 1
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise RulesError(f"nft list table: {result.stderr.strip()}")
        try:
            # Megabytes at 10k services: parsed off the loop, like the comparison.
            listing: dict[str, Any] = await asyncio.to_thread(json.loads, result.stdout)
        except ValueError as error:
            raise RulesError(f"nft list table: unreadable JSON: {error}") from error
        return listing

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        touched = None
        if delta is not None and not verify:
            touched = self._index.apply_delta(delta.gone, delta.new)
        if touched is None:
            touched = self._index.update(portals)
        try:
            # A build replaces a table whether or not one exists; only a family
            # with nothing wanted needs a look for a stale table. The look goes
            # first: listing after a big build makes libnftables refetch its
            # cache on the next change (40 ms at 20k elements, not 0.3).
            existing: set[int] = set()
            if any(f not in self._applied and not self._index.wanted(f) for f in FAMILIES):
                existing = await self._tables()
            for family in FAMILIES:
                wanted = self._index.wanted(family)
                trusted = family in self._applied
                last = self._applied.pop(family, None)
                if not trusted:
                    if wanted or family in existing:
                        last = await self._build(family)
                elif last is None:  # we left no table here
                    if wanted:
                        last = await self._build(family)
                elif verify:
                    last = await self._verify(family, wanted)
                else:
                    await self._send_changes(family, last, touched)
                self._applied[family] = last
        except RulesError:
            self._applied.clear()  # next time: replace the tables, trust nothing
            self._skeleton.clear()
            raise

    async def _build(self, family: int) -> Elements:
        """Replace the whole table (or make it) in one transaction; its elements."""
        desired = self._index.elements(family)
        await self._send(render_nft_table_of(desired, self.prefix, family))
        self.full_builds += 1
        self._skeleton.pop(family, None)
        return desired

    async def _send_changes(self, family: int, last: Elements, touched: set[ItemKey]) -> None:
        """Turn `last` (what we applied) into the wanted elements; `last` follows."""
        gone: dict[str, list[str]] = {}
        new: dict[str, list[str]] = {}
        for item in sorted(touched):
            item_family, name, key = item
            if item_family != family:
                continue
            want = self._index.text(item)
            have = last.setdefault(name, {}).get(key)
            if want == have:
                continue
            if have is not None:
                gone.setdefault(name, []).append(key)
                del last[name][key]
            if want is not None:
                new.setdefault(name, []).append(want)
                last[name][key] = want
        fam = nft_family(family)
        lines: list[str] = []
        for name in (*NFT_MAPS, NFT_SET):
            if name in gone:
                lines.append(f"delete element {fam} {self.table} {name} {{ "
                             f"{', '.join(gone[name])} }}")
            if name in new:
                lines.append(f"add element {fam} {self.table} {name} {{ "
                             f"{', '.join(new[name])} }}")
        if lines:
            await self._send("\n".join(lines) + "\n")

    async def _verify(self, family: int, wanted: bool) -> Elements | None:
        """Compare the kernel's table with what is wanted and repair; what it holds after."""
        listing = await self._read(family)
        if listing is None:
            return await self._build(family) if wanted else None
        try:
            skeleton, shape, desired, diff = await asyncio.to_thread(
                self._compare, listing, family)
        except (KeyError, TypeError, ValueError) as error:
            raise RulesError(f"nft list table: unexpected listing: {error!r}") from error
        learned = self._skeleton.get(family)
        if learned is None and shape == expected_shape(self.prefix, family):
            self._skeleton[family] = learned = skeleton
        if learned != skeleton:
            return await self._build(family)
        if diff:
            await self._send(diff)
        return desired

    def _compare(self, listing: dict[str, Any],
                 family: int) -> tuple[str, Shape, Elements, str]:
        """(skeleton, shape, wanted elements, the nft -f text from listed to wanted).

        Pure work over every element (~0.1 s at 10k services): it runs in a
        worker thread while apply, the index's only writer, waits for it.
        """
        skeleton, current = parse_table(listing)
        desired = self._index.elements(family)
        return (skeleton, listed_shape(listing), desired,
                render_nft_diff(current, desired, self.prefix, family))

    async def remove_all(self) -> list[str]:
        removed = []
        for family in sorted(await self._tables()):
            fam = nft_family(family)
            await self._send(f"delete table {fam} {self.table}\n")
            removed.append(f"nft: table {fam} {self.table}")
        self._applied.clear()
        self._skeleton.clear()
        return removed

    async def cleanup(self) -> None:
        await self.remove_all()


__all__ = ["NFT_SET", "NftRules", "parse_table"]
