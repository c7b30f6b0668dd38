"""Reading capability sets, and what the start-up check says without them."""

from __future__ import annotations

import pytest

from uproxy.rules.nft import input_drop_warnings
from uproxy.rules.privilege import (
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    CapSets,
    PrivilegeError,
    check_rules_privilege,
    parse_status,
)

STATUS = """Name:\tuproxy
Uid:\t65534\t65534\t65534\t65534
CapInh:\t0000000000001000
CapPrm:\t0000000000001000
CapEff:\t0000000000001000
CapBnd:\t0000000000001000
CapAmb:\t0000000000001000
"""
NET_ADMIN = 1 << CAP_NET_ADMIN


def test_status_gives_the_sets() -> None:
    caps = parse_status(STATUS)
    assert caps == CapSets(NET_ADMIN, NET_ADMIN, NET_ADMIN, NET_ADMIN)
    assert caps.has(CAP_NET_ADMIN) and caps.has(CAP_NET_ADMIN, "ambient")
    assert not caps.has(0)


def test_no_cap_net_admin_is_one_line_naming_it() -> None:
    with pytest.raises(PrivilegeError) as raised:
        check_rules_privilege("--rules nft", runs_tools=False, takes_xtables_lock=False,
                              uid=0, caps=CapSets())
    message = str(raised.value)
    assert message.startswith("--rules nft: needs CAP_NET_ADMIN")
    assert "\n" not in message


def test_root_or_ambient_capability_passes() -> None:
    held = CapSets(NET_ADMIN, NET_ADMIN, NET_ADMIN, NET_ADMIN)
    check_rules_privilege("--rules iptables", runs_tools=True, takes_xtables_lock=False,
                          uid=0, caps=CapSets(0, NET_ADMIN, NET_ADMIN, 0))
    check_rules_privilege("--rules iptables", runs_tools=False, takes_xtables_lock=False,
                          uid=1000, caps=held)


def test_legacy_xtables_need_cap_net_raw_too() -> None:
    with pytest.raises(PrivilegeError) as raised:
        check_rules_privilege("--rules iptc", runs_tools=False, takes_xtables_lock=True,
                              uid=0, caps=CapSets(0, NET_ADMIN, NET_ADMIN, 0))
    message = str(raised.value)
    assert message.startswith("--rules iptc: legacy xtables need CAP_NET_RAW besides "
                              "CAP_NET_ADMIN")
    assert "\n" not in message
    both = NET_ADMIN | 1 << CAP_NET_RAW
    check_rules_privilege("--rules iptc", runs_tools=True, takes_xtables_lock=True,
                          uid=0, caps=CapSets(0, both, both, 0))


def test_only_dropping_input_chains_of_other_tables_are_warned_about() -> None:
    def chain(table: str, hook: str, policy: str, family: str = "ip") -> dict[str, object]:
        return {"chain": {"family": family, "table": table, "name": "INPUT", "hook": hook,
                          "policy": policy, "type": "filter", "prio": 0}}

    listing = {"nftables": [
        {"metainfo": {}}, chain("filter", "input", "drop"), chain("filter", "output", "drop"),
        chain("fw", "input", "accept", "inet"), chain("uproxy", "input", "drop"),
        chain("fw6", "input", "drop", "inet")]}
    warnings = input_drop_warnings(listing, "uproxy")
    assert [w.split(" drops")[0] for w in warnings] == [
        "--rules nft: table ip filter chain INPUT", "--rules nft: table inet fw6 chain INPUT"]


def test_a_chain_that_ends_in_an_unconditional_drop_or_reject_is_warned_about() -> None:
    """firewalld's way: policy accept, and a last rule that rejects everything left."""
    def rules(*exprs: list[dict[str, object]]) -> dict[str, object]:
        return {"nftables": [{"metainfo": {}}] + [
            {"rule": {"family": "inet", "table": "firewalld", "chain": "filter_INPUT",
                      "handle": i, "expr": expr}} for i, expr in enumerate(exprs)]}

    counter = {"counter": {"packets": 0, "bytes": 0}}
    from_lo = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}
    listing = {"nftables": [{"metainfo": {}}, {"chain": {
        "family": "inet", "table": "firewalld", "name": "filter_INPUT", "hook": "input",
        "policy": "accept", "type": "filter", "prio": 10}}]}
    key = ("inet", "firewalld", "filter_INPUT")

    rejecting = rules([from_lo, {"accept": None}], [{"reject": {"type": "icmpx"}}])
    (warning,) = input_drop_warnings(listing, "uproxy", {key: rejecting})
    assert warning.startswith("--rules nft: table inet firewalld chain filter_INPUT ends in "
                              "a rule that rejects all input")
    assert "nft insert rule inet firewalld filter_INPUT ct status dnat accept" in warning
    iptables_drop = rules([counter, {"xt": {"type": "target", "name": "DROP"}}])
    assert len(input_drop_warnings(listing, "uproxy", {key: iptables_drop})) == 1
    only_some = rules([from_lo, counter, {"drop": None}])
    assert input_drop_warnings(listing, "uproxy", {key: only_some}) == []
    assert input_drop_warnings(listing, "uproxy") == []
