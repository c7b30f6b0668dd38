"""The `nft` backend: one native table per family, services as map elements.

`table ip uproxy` (and `ip6`) holds fixed chains that look the destination
up in maps keyed by `daddr . l4proto . dport`; a service is a few map
elements. Each apply reads the table back (`nft -j list table`): when its
chains and maps are what we built, only the element difference is sent, in
one small `nft -f` transaction; when anything else differs (someone flushed
a chain, the table is gone, a fresh process after a crash) the whole table
is replaced in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from uproxy.rules import command
from uproxy.rules.base import Portal, RulesError
from uproxy.rules.render import (
    FAMILIES,
    NFT_SET,
    check_chain_prefix,
    nft_elements,
    nft_family,
    nft_table_name,
    portal_entries,
    render_nft,
    render_nft_diff,
    render_nft_table,
)

Elements = dict[str, dict[str, str]]


def _part(value: Any) -> str:
    return str(value)


def _key_text(key: Any) -> str:
    if isinstance(key, dict) and "concat" in key:
        return " . ".join(_part(p) for p in key["concat"])
    return _part(key)


def parse_table(listing: dict[str, Any]) -> tuple[str, Elements]:
    """(skeleton, elements) of one table from `nft -j list table`.

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
                    texts[key_text] = f"{key_text}{note} : {_key_text(value)}"
            elif kind == "set":
                texts = elements.setdefault(body["name"], {})
                for key in found:
                    if isinstance(key, dict) and "elem" in key:
                        key = key["elem"]["val"]
                    texts[_key_text(key)] = _key_text(key)
    return json.dumps(skeleton, sort_keys=True), elements


class NftRules:
    name = "nft"

    def __init__(self, chain_prefix: str = "UPROXY", *,
                 command_prefix: Sequence[str] = ()) -> None:
        self.prefix = check_chain_prefix(chain_prefix)
        self.table = nft_table_name(self.prefix)
        self.command_prefix = tuple(command_prefix)
        self._skeleton: dict[int, str] = {}  # what our last full build looked like
        # Families seen without our table while nothing was wanted there: only
        # this process makes the table, so they need no listing until wanted.
        self._absent: set[int] = set()
        self.transactions = 0  # nft -f runs, for tests and metrics
        self.full_builds = 0

    def render(self, portals: Sequence[Portal]) -> str:
        return render_nft(portals, self.prefix)

    async def _nft(self, *argv: str, stdin: str | None = None) -> command.Result:
        return await command.run([*self.command_prefix, "nft", *argv], stdin)

    async def _send(self, text: str) -> None:
        result = await self._nft("-f", "-", stdin=text)
        self.transactions += 1
        if result.returncode != 0:
            raise RulesError(f"nft -f: {command.failing_line(result.stderr, text)}")

    async def _read(self, family: int) -> tuple[str, Elements] | None:
        """The table's skeleton and elements, or None when it does not exist."""
        result = await self._nft("-j", "list", "table", nft_family(family), self.table)
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise RulesError(f"nft list table: {result.stderr.strip()}")
        return parse_table(json.loads(result.stdout))

    async def apply(self, portals: Sequence[Portal]) -> None:
        entries = portal_entries(portals)
        for family in FAMILIES:
            mine = [e for e in entries if e.family == family]
            if not mine and family in self._absent:
                continue
            current = await self._read(family)
            if current is None and not mine:
                self._absent.add(family)
                continue
            self._absent.discard(family)
            desired = nft_elements(mine)
            if current is not None and self._skeleton.get(family) == current[0]:
                diff = render_nft_diff(current[1], desired, self.prefix, family)
                if diff:
                    await self._send(diff)
                continue
            await self._send(render_nft_table(mine, self.prefix, family))
            self.full_builds += 1
            built = await self._read(family)
            if built is not None:
                self._skeleton[family] = built[0]

    async def remove_all(self) -> list[str]:
        removed = []
        for family in FAMILIES:
            fam = nft_family(family)
            result = await self._nft("list", "table", fam, self.table)
            if result.returncode != 0:
                continue
            await self._send(f"delete table {fam} {self.table}\n")
            removed.append(f"nft: table {fam} {self.table}")
        self._skeleton.clear()
        self._absent.clear()
        return removed

    async def cleanup(self) -> None:
        await self.remove_all()


__all__ = ["NFT_SET", "NftRules", "parse_table"]
