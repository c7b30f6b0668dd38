"""`uproxy explain` output: golden files, and kube-proxy's real chain names."""

from __future__ import annotations

import pytest

from tests.unit.test_render import DNS, V6, WEB, check_golden, sample_portals
from uproxy.explain import explain
from uproxy.kubeproxy import probability, sep_chain, svc_chain
from uproxy.model import DesiredPort, Endpoint
from uproxy.rules.base import NoRules, Rules
from uproxy.rules.iptables import IptablesRules
from uproxy.rules.nft import NftRules

PORTS = [
    DesiredPort(WEB, (Endpoint("198.18.5.1", 8080), Endpoint("198.18.5.2", 8080),
                      Endpoint("198.18.5.3", 8080))),
    DesiredPort(DNS, (Endpoint("198.18.5.9", 53),), affinity_timeout=10800.0),
    DesiredPort(V6, ()),
]


def test_kube_proxy_chain_names_match_upstream() -> None:
    # Values from kubernetes pkg/proxy/iptables/proxier_test.go.
    assert svc_chain("ns1/svc1:p80", "TCP") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert [probability(n) for n in (3, 2)] == ["0.3333333333", "0.5000000000"]


@pytest.mark.parametrize("rules", [IptablesRules(), NftRules(), NoRules()],
                         ids=["iptables", "nft", "none"])
def test_explain_matches_golden(rules: Rules) -> None:
    check_golden(f"explain_{rules.name}.txt", explain(PORTS, sample_portals(), rules))


def test_explain_compare_matches_golden() -> None:
    text = explain(PORTS, sample_portals(), IptablesRules(), compare=True)
    check_golden("explain_compare.txt", text)
    assert text.count("--probability") == 2  # 1/3 then 1/2, the last endpoint takes the rest
    assert "ipvsadm -A -t 198.18.1.10:80 -s rr" in text
    assert "KUBE-LOOP-BACK 198.18.5.1,tcp:8080,198.18.5.1" in text
