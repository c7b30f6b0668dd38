"""Rendering is pure: portals in, exact rule text out (golden files), safe names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uproxy.model import Frontend, ServicePortName
from uproxy.rules.base import Portal
from uproxy.rules.iptables import jump_fixes, parse_save
from uproxy.rules.nft import parse_table
from uproxy.rules.render import (
    MULTIPORT_MAX,
    PORT_BLOCK,
    ElementIndex,
    check_chain_prefix,
    multiport_lists,
    nft_elements,
    portal_entries,
    render_iptables,
    render_nft,
    render_nft_diff,
    render_restore,
    safe_comment,
)

GOLDEN = Path(__file__).parent.parent / "golden"

WEB = Frontend(ServicePortName("default", "web", "http", "TCP"), 80, "TCP",
               cluster_ips=("198.18.1.10",), node_port=30080,
               external_ips=("198.18.2.10",), load_balancer_ips=("198.18.2.20",))
DNS = Frontend(ServicePortName("kube-system", "dns", "dns", "UDP"), 53, "UDP",
               cluster_ips=("198.18.1.53",))
V6 = Frontend(ServicePortName("default", "six", "", "TCP"), 443, "TCP",
              cluster_ips=("fd00:0:0::10",), node_port=30443)


def sample_portals() -> list[Portal]:
    return [Portal(WEB, "0.0.0.0", 40001), Portal(DNS, "0.0.0.0", 40002),
            Portal(V6, "::", 40003)]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPROXY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; UPROXY_UPDATE_GOLDEN=1 to accept"


def test_iptables_render_matches_golden() -> None:
    check_golden("render_iptables.txt", render_iptables(sample_portals(), "UPROXY"))


def test_nft_render_matches_golden() -> None:
    check_golden("render_nft.txt", render_nft(sample_portals(), "UPROXY"))


def test_dnat_to_bind_address_when_listener_is_not_wildcard() -> None:
    text = render_iptables([Portal(WEB, "198.18.0.1", 40001)], "UPROXY")
    assert "-j DNAT --to-destination 198.18.0.1:40001" in text
    assert "REDIRECT" not in text


def test_listener_of_other_family_gets_no_rule_and_a_note() -> None:
    text = render_iptables([Portal(V6, "198.18.0.1", 40003)], "UPROXY")
    assert "fd00:0:0::10" in text.splitlines()[0]  # the note
    assert "-d fd00::10/128" not in text


@pytest.mark.parametrize("evil", [
    'x" -j ACCEPT\n-A INPUT -j DROP #',
    "a b\tc;d{e}f'g$(h)`i`\\",
    "é" * 500,
])
def test_comments_cannot_inject(evil: str) -> None:
    frontend = Frontend(ServicePortName("ns", evil, "p", "TCP"), 80, "TCP", ("198.18.1.1",))
    (entry,) = portal_entries([Portal(frontend, "0.0.0.0", 40001)])
    assert entry.comment == safe_comment(f"ns/{evil}:p")
    assert all(c.isalnum() or c in "._:/@+=-" for c in entry.comment)
    assert len(entry.comment) <= 240
    text = render_restore([entry], "UPROXY")
    ours = [line for line in text.splitlines() if line.startswith("-A UPROXY-")]
    # the container portal, the two host chains' jumps, the accept: one rule per line
    assert len(ours) == 4
    assert all(line.count('"') == 2 for line in ours)  # the comment stays one quoted word


def test_chain_prefix_must_fit_chain_names() -> None:
    assert check_chain_prefix("KUBE") == "KUBE"
    with pytest.raises(ValueError, match="--chain-prefix"):
        check_chain_prefix("A-VERY-LONG-PREFIX")


def test_jump_fixes_insert_missing_and_delete_duplicates() -> None:
    saved = parse_save(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:U-PORTALS-HOST - [0:0]\n"
        "-A OUTPUT -j U-PORTALS-HOST\n-A OUTPUT -m comment --comment x -j U-PORTALS-HOST\n"
        "COMMIT\n*filter\n-A INPUT -m comment --comment y -j U-NODEPORT-NON-LOCAL\nCOMMIT\n")
    fixes = jump_fixes(saved, "U")
    # Jumps of another shape (an older uproxy's, a hand-made one) are replaced
    # by ours: one copy, in place, as rendered.
    assert fixes["nat"] == [
        '-I PREROUTING 1 -m comment --comment "uproxy u-portals-container" '
        "-j U-PORTALS-CONTAINER",
        "-D OUTPUT -j U-PORTALS-HOST",
        "-D OUTPUT -m comment --comment x -j U-PORTALS-HOST",
        '-I OUTPUT 1 -m comment --comment "uproxy u-portals-host" -j U-PORTALS-HOST',
        '-A PREROUTING -m comment --comment "uproxy u-nodeport-container" '
        "-j U-NODEPORT-CONTAINER",
        '-A OUTPUT -m comment --comment "uproxy u-nodeport-host" -j U-NODEPORT-HOST',
    ]
    # The filter jump takes only a connection's first packet (conntrack NEW).
    assert fixes["filter"] == [
        "-D INPUT -m comment --comment y -j U-NODEPORT-NON-LOCAL",
        '-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "uproxy u-nodeport-non-local" '
        "-j U-NODEPORT-NON-LOCAL",
    ]


def test_jump_fixes_move_a_pushed_away_jump_back_and_leave_placed_ones_alone() -> None:
    portals = '-m comment --comment "uproxy u-portals-container" -j U-PORTALS-CONTAINER'
    nodeports = '-m comment --comment "uproxy u-nodeport-container" -j U-NODEPORT-CONTAINER'
    host = '-m comment --comment "uproxy u-portals-host" -j U-PORTALS-HOST'
    host_nodeports = '-m comment --comment "uproxy u-nodeport-host" -j U-NODEPORT-HOST'
    local = ('-m conntrack --ctstate NEW -m comment --comment "uproxy u-nodeport-non-local" '
             "-j U-NODEPORT-NON-LOCAL")

    def save(prerouting: list[str], output: list[str], input_: list[str]) -> str:
        return ("*nat\n" + "".join(f"-A PREROUTING {r}\n" for r in prerouting)
                + "".join(f"-A OUTPUT {r}\n" for r in output) + "COMMIT\n*filter\n"
                + "".join(f"-A INPUT {r}\n" for r in input_) + "COMMIT\n")

    placed = save([portals, "-j RETURN", nodeports], [host, host_nodeports], [local, "-j ACCEPT"])
    assert jump_fixes(parse_save(placed), "U") == {}

    # Another program inserted before our first jumps and appended after our last one.
    pushed = save(["-p tcp -j RETURN", portals, nodeports, "-p udp -j RETURN"],
                  ["-j RETURN", host, host_nodeports], ["-j DROP", local])
    assert jump_fixes(parse_save(pushed), "U") == {
        "nat": [f"-D PREROUTING {portals}", f"-I PREROUTING 1 {portals}",
                f"-D OUTPUT {host}", f"-I OUTPUT 1 {host}",
                f"-D PREROUTING {nodeports}", f"-A PREROUTING {nodeports}"],
        "filter": [f"-D INPUT {local}", f"-I INPUT 1 {local}"],
    }

    # Two identical copies, one in place: deleting by text would hit the placed
    # one first, so both go and one comes back.
    doubled = save([portals, "-j RETURN", portals, nodeports], [host, host_nodeports], [local])
    assert jump_fixes(parse_save(doubled), "U") == {
        "nat": [f"-D PREROUTING {portals}", f"-D PREROUTING {portals}",
                f"-I PREROUTING 1 {portals}"],
    }


def test_nft_diff_of_one_service_touches_only_its_elements() -> None:
    before = nft_elements([e for e in portal_entries(sample_portals()) if e.family == 4])
    after = nft_elements([e for e in portal_entries(sample_portals()[:1]) if e.family == 4])
    diff = render_nft_diff(before, after, "UPROXY", 4)
    assert diff == (
        "delete element ip uproxy portal_redirect { 198.18.1.53 . udp . 53 }\n"
        "delete element ip uproxy proxy_ports { udp . 40002 }\n")
    assert render_nft_diff(after, after, "UPROXY", 4) == ""


def test_nft_listing_parses_back_to_rendered_elements() -> None:
    listing = {"nftables": [
        {"map": {"family": "ip", "name": "portal_redirect", "table": "uproxy", "handle": 4,
                 "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "inet_service",
                 "elem": [[{"elem": {"val": {"concat": ["198.18.1.10", "tcp", 80]},
                                     "comment": "default/web:http"}}, 40001]]}},
        {"map": {"family": "ip", "name": "portal_dnat", "table": "uproxy", "handle": 5,
                 "type": ["ipv4_addr", "inet_proto", "inet_service"],
                 "map": ["ipv4_addr", "inet_service"],
                 "elem": [[{"concat": ["198.18.1.11", "udp", 53]},
                           {"concat": ["198.18.0.1", 40003]}]]}},
    ]}
    skeleton, elements = parse_table(listing)
    assert "handle" not in skeleton
    assert elements["portal_redirect"] == {
        "198.18.1.10 . tcp . 80": '198.18.1.10 . tcp . 80 comment "default/web:http" : 40001'}
    assert elements["portal_dnat"] == {
        "198.18.1.11 . udp . 53": "198.18.1.11 . udp . 53 : 198.18.0.1 . 40003"}
    web = [e for e in portal_entries([Portal(WEB, "0.0.0.0", 40001)])
           if e.kind == "portal" and e.address == "198.18.1.10"]
    assert nft_elements(web)["portal_redirect"] == elements["portal_redirect"]


def test_element_index_follows_portal_lists_like_a_full_render() -> None:
    """Portal by portal, the index holds what nft_elements renders from scratch."""
    web, dns = sample_portals()[:2]
    moved = Portal(web.frontend, "0.0.0.0", 40009)  # same frontend, new listener
    twin = Portal(Frontend(ServicePortName("other", "web", "http", "TCP"), 80, "TCP",
                           cluster_ips=("198.18.1.10",)), "0.0.0.0", 40005)  # same VIP:port
    index = ElementIndex()
    timeline = [[web, dns], [web, dns], [web], [moved, dns], [moved, dns, twin], [twin], []]
    previous: dict[str, dict[str, str]] = {}
    for portals in timeline:
        touched = index.update(portals)
        expected = nft_elements([e for e in portal_entries(portals) if e.family == 4])
        assert index.elements(4) == expected
        assert index.wanted(4) == bool(portals)
        changed = {(4, name, key) for name in expected for key in
                   set(expected[name]) | set(previous.get(name, {}))
                   if expected[name].get(key) != previous.get(name, {}).get(key)}
        assert changed <= touched
        previous = expected
    assert index.update([]) == set()


def _pool() -> list[Portal]:
    web, dns, six = sample_portals()
    twin = Portal(Frontend(ServicePortName("other", "web", "http", "TCP"), 80, "TCP",
                           cluster_ips=("198.18.1.10",)), "0.0.0.0", 40005)  # same VIP:port
    return [web, dns, six, Portal(web.frontend, "0.0.0.0", 40009), twin,
            Portal(DNS, "198.18.0.1", 40002)]  # same frontend object, DNAT listener


POOL = _pool()


@given(st.lists(st.lists(st.sampled_from(range(len(POOL))), unique=True), max_size=8))
def test_element_index_from_deltas_equals_walking_every_portal(
        timeline: list[list[int]]) -> None:
    """Fed only what changed (or walking when a delta is refused), the index
    holds exactly what a walk of the whole list gives."""
    by_delta, by_walk = ElementIndex(), ElementIndex()
    previous: list[Portal] = []
    for picks in timeline:
        portals = [POOL[i] for i in picks]
        before = {family: by_delta.elements(family) for family in (4, 6)}
        gone = [p for p in previous if p not in portals]
        new = [p for p in portals if p not in previous]
        touched = by_delta.apply_delta(gone, new)
        if touched is None:  # a frontend object twice, or unknown: the walk
            touched = by_delta.update(portals)
        by_walk.update(portals)
        for family in (4, 6):
            after = by_delta.elements(family)
            assert after == by_walk.elements(family)
            assert by_delta.wanted(family) == by_walk.wanted(family)
            changed = {(family, name, key) for name in after
                       for key in set(after[name]) | set(before[family][name])
                       if after[name].get(key) != before[family][name].get(key)}
            assert changed <= touched  # the backend sends what changed
        previous = portals


def test_element_index_refuses_a_delta_it_cannot_follow() -> None:
    web, dns, _ = sample_portals()
    index = ElementIndex()
    index.update([web])
    assert index.apply_delta([dns], []) is None  # dns was never seen
    assert index.apply_delta([], [Portal(web.frontend, "0.0.0.0", 40009)]) is None  # twice
    assert index.apply_delta([web], [dns]) is not None
    assert index.elements(4) == nft_elements([e for e in portal_entries([dns])])


def _expand(dports: str) -> list[int]:
    ports: list[int] = []
    for item in dports.split(","):
        first, _, last = item.partition(":")
        ports += range(int(first), int(last or first) + 1)
    return ports


def _slots(dports: str) -> int:
    return sum(2 if ":" in item else 1 for item in dports.split(","))


def test_multiport_lists_pack_runs_per_block() -> None:
    assert multiport_lists([20001, 20000, 20002, 20005]) == ["20000:20002,20005"]
    assert multiport_lists([63, 64]) == ["63", "64"]  # two blocks: two rules
    alternate = list(range(0, 64, 2))  # 32 single ports in one block: 15 + 15 + 2
    assert [len(d.split(",")) for d in multiport_lists(alternate)] == [15, 15, 2]
    assert multiport_lists([]) == []


@given(st.sets(st.integers(1, 65535), max_size=300), st.integers(1, 65535))
def test_multiport_lists_cover_exactly_and_a_change_stays_in_its_block(
        ports: set[int], extra: int) -> None:
    lists = multiport_lists(ports)
    covered = [port for dports in lists for port in _expand(dports)]
    assert sorted(covered) == sorted(ports)  # every port once, nothing else
    assert all(_slots(dports) <= MULTIPORT_MAX for dports in lists)
    changed = set(multiport_lists(ports ^ {extra})) ^ set(lists)
    assert {port // PORT_BLOCK for dports in changed for port in _expand(dports)} <= {
        extra // PORT_BLOCK}
