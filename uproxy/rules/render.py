"""Pure rendering of portals into kernel rule text (iptables-restore, nft -f).

Every backend starts from `portal_entries`: one flat, sorted list of
"traffic for this destination goes to this listener" facts, per address
family. The iptables and iptc backends turn each entry into one rule in the
chains below; the nft backend turns each into one map element, so a change
of one service is a change of a few elements.

  nat    PREFIX-PORTALS-CONTAINER   from PREROUTING (first)  -d VIP --dport PORT -> listener
  nat    PREFIX-PORTALS-HOST        from OUTPUT (first)      -j PREFIX-PORTALS-CONTAINER
  nat    PREFIX-NODEPORT-CONTAINER  from PREROUTING (last)   dst-type LOCAL --dport NODEPORT -> …
  nat    PREFIX-NODEPORT-HOST       from OUTPUT (last)       -j PREFIX-NODEPORT-CONTAINER
  filter PREFIX-NODEPORT-NON-LOCAL  from INPUT (first, NEW)  ctstate DNAT, PROXYPORTS -j ACCEPT

"-> listener" is `REDIRECT --to-ports PROXYPORT` when the listener is bound
to the wildcard address, else `DNAT --to-destination BINDIP:PROXYPORT`.

A host rule would be the very text of its container rule (REDIRECT lands on
a wildcard listener from either hook, a DNAT goes to the bind address from
either), so each HOST chain is one jump into its CONTAINER chain: a service
port costs one nat rule, not two. The filter chain accepts the proxy ports
in multiport rules, one per 64-port block (fewer when blocks hold ranges),
so that a change of one service rewrites one or two of them. Together this
is a third of the rules a rule-per-port layout needs; iptables-restore on
the nf_tables variant spends ~35 µs per rule, which is what a full sync of
10k services costs.

Names come from users (a services file, the API server), so every comment is
reduced to a safe alphabet and always quoted: no name can end the quoted
string or start another option or rule.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from uproxy.rules.base import Portal

Kind = Literal["portal", "nodeport"]
FAMILIES: tuple[int, ...] = (4, 6)
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
COMMENT_MAX = 240  # xt_comment allows 255 bytes
_SAFE_COMMENT = re.compile(r"[^A-Za-z0-9._:/@+=-]")
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,8}$")

PORTALS_CONTAINER = "PORTALS-CONTAINER"
PORTALS_HOST = "PORTALS-HOST"
NODEPORT_CONTAINER = "NODEPORT-CONTAINER"
NODEPORT_HOST = "NODEPORT-HOST"
NODEPORT_NON_LOCAL = "NODEPORT-NON-LOCAL"


def check_chain_prefix(prefix: str) -> str:
    """The prefix, or ValueError in one line: it must fit iptables' 28-char chain names."""
    if not _PREFIX.match(prefix):
        raise ValueError(
            f"--chain-prefix {prefix!r}: use 1-9 letters, digits or _, starting with a letter"
        )
    return prefix


def safe_comment(text: str) -> str:
    """`text` reduced to characters that mean nothing to iptables-restore or nft."""
    return _SAFE_COMMENT.sub("_", text)[:COMMENT_MAX]


class Entry(NamedTuple):
    """Traffic for (address, protocol, port) goes to the listener at proxy_ip:proxy_port.

    `address` is None for a node port (any local address). A tuple (not a
    dataclass): 20k of them are made, hashed and sorted on a full sync, and
    the field order is the sort order (a "portal" always has an address, a
    "nodeport" never, so None is never compared with a string).
    """

    family: int
    kind: Kind
    protocol: str  # "tcp" | "udp"
    port: int
    address: str | None
    proxy_ip: str
    proxy_port: int
    comment: str

    @property
    def redirect(self) -> bool:
        return self.proxy_ip in WILDCARDS


# A dotted quad without leading zeros: already canonical, and 30x quicker to
# recognise than to parse (a full sync looks at every address of 10k services).
_DOTTED_QUAD = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                          r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\Z")


@functools.lru_cache(maxsize=65536)
def family_of(address: str) -> int:
    if _DOTTED_QUAD.match(address):
        return 4
    return ipaddress.ip_address(address).version


@functools.lru_cache(maxsize=65536)
def _canonical(address: str) -> str:
    if _DOTTED_QUAD.match(address):
        return address
    return str(ipaddress.ip_address(address))


def _target_fits(family: int, proxy_ip: str) -> bool:
    return proxy_ip in WILDCARDS or family_of(proxy_ip) == family


def portal_entries(portals: Iterable[Portal]) -> list[Entry]:
    """Every destination -> listener fact for these portals, sorted, without duplicates.

    A portal whose listener is bound to one address of the other family
    cannot be reached by DNAT from that family; such addresses get no rule
    (`skipped` says which).
    """
    entries: set[Entry] = set()
    for portal in portals:
        entries.update(entries_of(portal))
    return sorted(entries)


def entries_of(portal: Portal) -> list[Entry]:
    """One portal's entries, unsorted."""
    frontend = portal.frontend
    protocol = frontend.protocol.lower()
    comment = safe_comment(str(frontend.name))
    proxy_ip, proxy_port = portal.proxy_ip, portal.proxy_port
    entries: list[Entry] = []
    families: set[int] = set()
    for address in frontend.addresses:
        family = family_of(address)
        families.add(family)
        if _target_fits(family, proxy_ip):
            entries.append(Entry(family, "portal", protocol, frontend.port, _canonical(address),
                                 proxy_ip, proxy_port, comment))
    if frontend.node_port:
        if not families:
            families = {4 if proxy_ip in WILDCARDS else family_of(proxy_ip)}
        for family in sorted(families):
            if _target_fits(family, proxy_ip):
                entries.append(Entry(family, "nodeport", protocol, frontend.node_port, None,
                                     proxy_ip, proxy_port, comment))
    return entries


def skipped(portals: Iterable[Portal]) -> list[str]:
    """Addresses that get no rule because the listener's bind address has the other family."""
    notes = []
    for portal in portals:
        for address in portal.frontend.addresses:
            if not _target_fits(family_of(address), portal.proxy_ip):
                notes.append(f"{portal.frontend.name} {address}: listener bound to "
                             f"{portal.proxy_ip} (other family), no rule")
    return notes


# ---------------------------------------------------------------- iptables


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule in a built-in chain that sends packets into one of our chains."""

    table: str
    chain: str  # built-in chain
    target: str  # our chain
    first: bool  # inserted at position 1, else appended
    new_only: bool = False  # only packets that open a connection (conntrack NEW)

    @property
    def spec(self) -> str:
        match = "-m conntrack --ctstate NEW " if self.new_only else ""
        return f'{match}-m comment --comment "uproxy {self.target.lower()}" -j {self.target}'


def chain_names(prefix: str) -> dict[str, list[str]]:
    """Our chains per table."""
    return {
        "nat": [f"{prefix}-{c}" for c in
                (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)],
        "filter": [f"{prefix}-{NODEPORT_NON_LOCAL}"],
    }


def jumps(prefix: str) -> list[Jump]:
    return [
        Jump("nat", "PREROUTING", f"{prefix}-{PORTALS_CONTAINER}", True),
        Jump("nat", "OUTPUT", f"{prefix}-{PORTALS_HOST}", True),
        Jump("nat", "PREROUTING", f"{prefix}-{NODEPORT_CONTAINER}", False),
        Jump("nat", "OUTPUT", f"{prefix}-{NODEPORT_HOST}", False),
        # The filter table is walked by every packet, not only a connection's
        # first as nat is: later packets skip our chain (as kube-proxy's
        # KUBE-EXTERNAL-SERVICES jump does); the host accepts established ones.
        Jump("filter", "INPUT", f"{prefix}-{NODEPORT_NON_LOCAL}", True, new_only=True),
    ]


def portal_hop(backend: str, prefix: str, entry: Entry, where: str) -> str:
    """How `backend` steers a packet of `entry` to its listener, in the very
    rule text it installs; `where` is "container" (from another host or pod,
    PREROUTING) or "host" (from this host, OUTPUT). `uproxy explain` and the
    status page both say it with this."""
    hook = "PREROUTING" if where == "container" else "OUTPUT"
    if backend in ("iptables", "iptc"):
        part = PORTALS_CONTAINER if entry.kind == "portal" else NODEPORT_CONTAINER
        chain = f"{prefix}-{part}"
        if where == "host":  # the HOST chain is one jump into the CONTAINER chain
            host = PORTALS_HOST if entry.kind == "portal" else NODEPORT_HOST
            chain = f"{prefix}-{host} -> {chain}"
        return f"nat {hook} -> {chain}: {iptables_rule_args(entry)}"
    if backend == "nft":
        chain = f"{'portals' if entry.kind == 'portal' else 'nodeports'}_{where}"
        return (f"table {nft_family(entry.family)} {nft_table_name(prefix)} {chain} "
                f"(hook {hook.lower()}) map @{nft_map_of(entry)}: {nft_element(entry)}")
    return f"({backend}: no kernel rule)"


def _host_bits(family: int) -> int:
    return 32 if family == 4 else 128


def _to_listener(entry: Entry) -> str:
    if entry.redirect:
        return f"-j REDIRECT --to-ports {entry.proxy_port}"
    ip = entry.proxy_ip if entry.family == 4 else f"[{entry.proxy_ip}]"
    return f"-j DNAT --to-destination {ip}:{entry.proxy_port}"


def iptables_rule_args(entry: Entry) -> str:
    """The match and target of one entry's nat rule (without `-A CHAIN`)."""
    # The order iptables-save prints, so the kernel's copy compares equal.
    proto = f"-p {entry.protocol}"
    dport = f"-m {entry.protocol} --dport {entry.port}"
    if entry.address is not None:
        match = f"-d {entry.address}/{_host_bits(entry.family)} {proto} {dport}"
    else:
        match = f"{proto} -m addrtype --dst-type LOCAL {dport}"
    return f'{match} -m comment --comment "{entry.comment}" {_to_listener(entry)}'


PORT_BLOCK = 64  # proxy ports per filter block
MULTIPORT_MAX = 15  # xt_multiport: ports per rule, a range counts two
PROXY_PORTS_COMMENT = "uproxy proxy ports"


def host_jump_comment(container_chain: str) -> str:
    return f"uproxy same as {container_chain}"


def host_jump_args(container_chain: str) -> str:
    """The one rule of a HOST chain: the same portals as from PREROUTING."""
    return f'-m comment --comment "{host_jump_comment(container_chain)}" -j {container_chain}'


def port_runs(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ports as (first, last) runs of consecutive numbers."""
    runs: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if runs and runs[-1][1] == port - 1:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    return runs


def multiport_lists(ports: Iterable[int]) -> list[str]:
    """`--dports` values covering exactly these ports, one per rule.

    Ports are grouped in blocks of PORT_BLOCK numbers, each block in as few
    rules as multiport's 15 slots allow, so adding or removing a port
    changes only the rules of its block.
    """
    blocks: dict[int, list[int]] = {}
    for port in ports:
        blocks.setdefault(port // PORT_BLOCK, []).append(port)
    lists: list[str] = []
    for block in sorted(blocks):
        items: list[str] = []
        slots = 0
        for first, last in port_runs(blocks[block]):
            item, cost = (str(first), 1) if first == last else (f"{first}:{last}", 2)
            if slots + cost > MULTIPORT_MAX:
                lists.append(",".join(items))
                items, slots = [], 0
            items.append(item)
            slots += cost
        lists.append(",".join(items))
    return lists


def iptables_accept_args(protocol: str, dports: str) -> str:
    """An ACCEPT of proxy ports for traffic that a nat rule sent there.

    `--ctstate DNAT`: REDIRECT and DNAT both mark the connection so. A client
    that dials NODE_IP:proxyPort itself is not accepted here, so a host whose
    INPUT policy drops keeps ClusterIP services off its own address; node
    ports reach their proxy port through a REDIRECT too, so they pass.
    """
    return (f"-p {protocol} -m conntrack --ctstate DNAT -m multiport --dports {dports} "
            f'-m comment --comment "{PROXY_PORTS_COMMENT}" -j ACCEPT')


def iptables_chain_rules(entries: Sequence[Entry], prefix: str) -> dict[str, list[str]]:
    """chain -> rule arguments, for one family's entries."""
    names = chain_names(prefix)
    portals_container, portals_host, nodeport_container, nodeport_host = names["nat"]
    (non_local,) = names["filter"]
    rules: dict[str, list[str]] = {chain: [] for chains in names.values() for chain in chains}
    proxy_ports: dict[str, set[int]] = {}
    for entry in entries:
        chain = portals_container if entry.kind == "portal" else nodeport_container
        rules[chain].append(iptables_rule_args(entry))
        proxy_ports.setdefault(entry.protocol, set()).add(entry.proxy_port)
    rules[portals_host].append(host_jump_args(portals_container))
    rules[nodeport_host].append(host_jump_args(nodeport_container))
    for protocol, ports in sorted(proxy_ports.items()):
        rules[non_local] += [iptables_accept_args(protocol, dports)
                             for dports in multiport_lists(ports)]
    return rules


def render_restore(
    entries: Sequence[Entry],
    prefix: str,
    jump_lines: dict[str, list[str]] | None = None,
    rules: dict[str, list[str]] | None = None,
) -> str:
    """iptables-restore --noflush input that (re)writes our chains for one family.

    Declaring a chain (`:NAME - [0:0]`) with --noflush empties it, so the
    transaction replaces exactly our chains and nothing else. `jump_lines`
    holds per table the -I/-A/-D lines that fix the jumps from built-in
    chains (the backend computes them from the kernel's state); None renders
    the jumps as they would be inserted into empty built-in chains. `rules`
    is `iptables_chain_rules(entries, prefix)` when the caller has it.
    """
    if jump_lines is None:
        jump_lines = {}
        for jump in jumps(prefix):
            verb = f"-I {jump.chain} 1" if jump.first else f"-A {jump.chain}"
            jump_lines.setdefault(jump.table, []).append(f"{verb} {jump.spec}")
    if rules is None:
        rules = iptables_chain_rules(entries, prefix)
    out: list[str] = []
    for table, chains in chain_names(prefix).items():
        out.append(f"*{table}")
        out.extend(f":{chain} - [0:0]" for chain in chains)
        for chain in chains:
            out.extend(f"-A {chain} {args}" for args in rules[chain])
        out.extend(jump_lines.get(table, []))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- nftables


def nft_table_name(prefix: str) -> str:
    return prefix.lower()


def nft_family(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


NFT_MAPS = ("portal_redirect", "portal_dnat", "nodeport_redirect", "nodeport_dnat")
NFT_SET = "proxy_ports"


def nft_map_of(entry: Entry) -> str:
    return f"{entry.kind}_{'redirect' if entry.redirect else 'dnat'}"


def nft_element(entry: Entry, *, with_value: bool = True) -> str:
    """One map element: `key comment "..." : value`."""
    key = f"{entry.protocol} . {entry.port}"
    if entry.address is not None:
        key = f"{entry.address} . {key}"
    if not with_value:
        return key
    value = str(entry.proxy_port) if entry.redirect else f"{entry.proxy_ip} . {entry.proxy_port}"
    return f'{key} comment "{entry.comment}" : {value}'


def nft_items(entry: Entry) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(map or set name, key, element text) of the two elements an entry makes."""
    key = f"{entry.protocol} . {entry.proxy_port}"
    return ((nft_map_of(entry), nft_element(entry, with_value=False), nft_element(entry)),
            (NFT_SET, key, key))


def nft_elements(entries: Sequence[Entry]) -> dict[str, dict[str, str]]:
    """map or set name -> {key: element text}; keys are what `delete element` needs.

    Two entries with one key (two services claim one VIP:port) keep the
    greatest text, so the choice does not depend on order (see ElementIndex).
    """
    elements: dict[str, dict[str, str]] = {name: {} for name in (*NFT_MAPS, NFT_SET)}
    for entry in entries:
        for name, key, text in nft_items(entry):
            have = elements[name].get(key)
            if have is None or text > have:
                elements[name][key] = text
    return elements


ItemKey = tuple[int, str, str]  # (family, map or set name, element key)
Item = tuple[int, str, str, str]  # (family, map or set name, element key, element text)
Known = tuple[object, str, int, tuple[Item, ...]]  # frontend, proxy ip and port, items


def _items_of(portal: Portal) -> tuple[Item, ...]:
    """Every map and set element one portal wants, per family."""
    return tuple((entry.family, name, key, text)
                 for entry in set(entries_of(portal))
                 for name, key, text in nft_items(entry))


class ElementIndex:
    """The nft elements of a portal list, kept up to date portal by portal.

    The proxier hands the backend every portal on every sync; rendering
    20k portals from scratch takes most of a second. A portal whose
    frontend is the very object seen last time, with the same listener,
    reuses what it rendered then, so a sync that changes one service renders
    one service. Each (family, map, key) counts the texts portals want for
    it; the element is the greatest text, as in `nft_elements`.
    """

    def __init__(self) -> None:
        self._portals: dict[int, Known] = {}  # by id() of the frontend (held, so ids stay unique)
        self._wanted: dict[ItemKey, list[str]] = {}  # the texts portals want, with repeats
        self._families: dict[int, int] = {}  # family -> items wanted

    def update(self, portals: Iterable[Portal]) -> set[ItemKey]:
        """Take the new portal list; the item keys whose element may have changed."""
        old = self._portals
        new: dict[int, Known] = {}
        added: list[tuple[Item, ...]] = []
        for portal in portals:
            frontend = portal.frontend
            slot = id(frontend)
            known = old.get(slot)
            if (known is not None and known[0] is frontend and known[1] == portal.proxy_ip
                    and known[2] == portal.proxy_port and slot not in new):
                new[slot] = known
                continue
            items = _items_of(portal)
            if slot in new:  # the same frontend object twice: a slot of its own
                slot = id(items)
            new[slot] = (frontend, portal.proxy_ip, portal.proxy_port, items)
            added.append(items)
        touched: set[ItemKey] = set()
        for slot, known in old.items():
            if new.get(slot) is not known:
                self._count(known[3], -1, touched)
        for items in added:
            self._count(items, 1, touched)
        self._portals = new
        return touched

    def apply_delta(self, gone: Iterable[Portal], new: Iterable[Portal]) -> set[ItemKey] | None:
        """`update` for a list that differs from the last one by exactly these
        portals: it costs the changed portals, not all of them. None (nothing
        done) when a gone portal is not known as it was, or a new one shares
        its frontend object with a known portal: then `update` must walk.
        """
        known = self._portals
        leaving: list[tuple[int, Known]] = []
        for portal in gone:
            slot = id(portal.frontend)
            seen = known.get(slot)
            if (seen is None or seen[0] is not portal.frontend
                    or seen[1] != portal.proxy_ip or seen[2] != portal.proxy_port):
                return None
            leaving.append((slot, seen))
        left = {slot for slot, _ in leaving}
        coming: list[tuple[int, Known]] = []
        for portal in new:
            slot = id(portal.frontend)
            if (slot in known and slot not in left) or any(slot == s for s, _ in coming):
                return None
            items = _items_of(portal)
            coming.append((slot, (portal.frontend, portal.proxy_ip, portal.proxy_port, items)))
        touched: set[ItemKey] = set()
        for slot, seen in leaving:
            del known[slot]
            self._count(seen[3], -1, touched)
        for slot, fresh in coming:
            known[slot] = fresh
            self._count(fresh[3], 1, touched)
        return touched

    def _count(self, items: Iterable[Item], step: int,
               touched: set[ItemKey]) -> None:
        wanted, families = self._wanted, self._families
        for family, name, key, text in items:
            item = (family, name, key)
            texts = wanted.get(item)
            if step > 0:
                if texts is None:
                    wanted[item] = [text]
                else:
                    texts.append(text)
            elif texts is not None:
                texts.remove(text)
                if not texts:
                    del wanted[item]
            families[family] = families.get(family, 0) + step
            touched.add(item)

    def text(self, item: ItemKey) -> str | None:
        texts = self._wanted.get(item)
        return max(texts) if texts else None

    def wanted(self, family: int) -> bool:
        return self._families.get(family, 0) > 0

    def elements(self, family: int) -> dict[str, dict[str, str]]:
        """What `nft_elements` gives for this family's entries."""
        elements: dict[str, dict[str, str]] = {name: {} for name in (*NFT_MAPS, NFT_SET)}
        for (item_family, name, key), texts in self._wanted.items():
            if item_family == family:
                elements[name][key] = max(texts)
        return elements


def render_nft_skeleton(prefix: str, family: int) -> list[str]:
    """The table's maps and chains, without elements."""
    fam = nft_family(family)
    addr = _addr_type(family)
    daddr = f"{fam} daddr"
    l4 = "meta l4proto { tcp, udp }"
    key = "meta l4proto . th dport"
    lines = [f"table {fam} {nft_table_name(prefix)} {{"]
    lines += [
        f"  map portal_redirect {{ type {addr} . inet_proto . inet_service : inet_service; }}",
        f"  map portal_dnat {{ type {addr} . inet_proto . inet_service : {addr} . inet_service; }}",
        "  map nodeport_redirect { type inet_proto . inet_service : inet_service; }",
        f"  map nodeport_dnat {{ type inet_proto . inet_service : {addr} . inet_service; }}",
        f"  set {NFT_SET} {{ type inet_proto . inet_service; }}",
    ]
    for hook, where in (("prerouting", "container"), ("output", "host")):
        lines += [
            f"  chain portals_{where} {{",
            f"    type nat hook {hook} priority -110; policy accept;",
            f"    {l4} redirect to : {daddr} . {key} map @portal_redirect",
            f"    {l4} dnat {fam} to {daddr} . {key} map @portal_dnat",
            "  }",
            f"  chain nodeports_{where} {{",
            f"    type nat hook {hook} priority -90; policy accept;",
            f"    fib daddr type local {l4} redirect to : {key} map @nodeport_redirect",
            f"    fib daddr type local {l4} dnat {fam} to {key} map @nodeport_dnat",
            "  }",
        ]
    lines += [
        "  chain nodeport_non_local {",
        "    type filter hook input priority -10; policy accept;",
        f"    ct status dnat {key} @{NFT_SET} accept",
        "  }",
        "}",
    ]
    return lines


def render_nft_table(entries: Sequence[Entry], prefix: str, family: int) -> str:
    """`nft -f` input that replaces the whole table for one family in one transaction.

    `add table` then `delete table` makes the delete succeed whether or not
    the table exists; the definition that follows recreates it.
    """
    return render_nft_table_of(nft_elements(entries), prefix, family)


def render_nft_table_of(elements_by_name: dict[str, dict[str, str]], prefix: str,
                        family: int) -> str:
    """`render_nft_table` from elements (`nft_elements`, `ElementIndex.elements`)."""
    fam = nft_family(family)
    table = nft_table_name(prefix)
    lines = [f"add table {fam} {table}", f"delete table {fam} {table}"]
    lines += render_nft_skeleton(prefix, family)
    for name, elements in elements_by_name.items():
        if elements:
            lines.append(f"add element {fam} {table} {name} {{")
            lines += [f"  {text}," for _, text in sorted(elements.items())]
            lines.append("}")
    return "\n".join(lines) + "\n"


def render_nft_diff(
    current: dict[str, dict[str, str]],
    desired: dict[str, dict[str, str]],
    prefix: str,
    family: int,
) -> str:
    """`nft -f` input that turns `current` elements into `desired` (empty when equal).

    An element whose value changed is deleted and added in the same
    transaction, so the change is atomic.
    """
    fam = nft_family(family)
    table = nft_table_name(prefix)
    lines: list[str] = []
    for name in (*NFT_MAPS, NFT_SET):
        have = current.get(name, {})
        want = desired.get(name, {})
        gone = sorted(k for k in have if k not in want or have[k] != want[k])
        new = sorted(k for k in want if k not in have or have[k] != want[k])
        if gone:
            lines.append(f"delete element {fam} {table} {name} {{ {', '.join(gone)} }}")
        if new:
            lines.append(f"add element {fam} {table} {name} {{ "
                         f"{', '.join(want[k] for k in new)} }}")
    return "\n".join(lines) + ("\n" if lines else "")


NOTHING_TO_INSTALL = "# no portals: nothing is installed\n"


def render_nft(portals: Sequence[Portal], prefix: str) -> str:
    """The tables the nft backend makes: one per family that has portals."""
    entries = portal_entries(portals)
    out = [f"# {note}\n" for note in skipped(portals)]
    for family in FAMILIES:
        mine = [e for e in entries if e.family == family]
        if mine:
            out.append(render_nft_table(mine, prefix, family))
    return "".join(out) if entries else "".join(out) + NOTHING_TO_INSTALL


def render_iptables(portals: Sequence[Portal], prefix: str) -> str:
    """The restores the iptables backend sends: one per family that has portals."""
    entries = portal_entries(portals)
    out = [f"# {note}\n" for note in skipped(portals)]
    for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        mine = [e for e in entries if e.family == family]
        if mine:
            out.append(f"# {tool} --noflush -w\n")
            out.append(render_restore(mine, prefix))
    return "".join(out) if entries else "".join(out) + NOTHING_TO_INSTALL
