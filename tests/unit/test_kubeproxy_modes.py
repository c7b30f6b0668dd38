"""What `explain --compare` says kube-proxy's modes program, checked line by line
against the shapes kube-proxy's own tests expect (pkg/proxy/nftables
TestOverallNFTablesRules and pkg/proxy/iptables): the same services in, the same
chain names, rules and map elements out."""

# The expected text below is one nftables rule per line, as kube-proxy writes it.
# ruff: noqa: E501

from __future__ import annotations

from collections import Counter

from uproxy.kubeproxy import (
    ext_chain,
    kube_proxy_iptables,
    kube_proxy_ipvs,
    kube_proxy_nftables,
    nft_chain_base,
    nft_endpoint_base,
    probability,
    sep_chain,
    svc_chain,
)
from uproxy.model import (
    DesiredPort,
    Endpoint,
    Frontend,
    ObjectName,
    Service,
    ServicePortName,
)

POD_CIDR = "10.0.0.0/8"  # kube-proxy's tests run with this cluster CIDR


def port(ns: str, name: str, cluster_ip: str, endpoints: list[str], *, node_port: int = 0,
         external: tuple[str, ...] = (), lb: tuple[str, ...] = (),
         affinity: float | None = None,
         external_endpoints: list[str] | None = None) -> DesiredPort:
    def eps(texts: list[str]) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(t.split(":")[0], int(t.split(":")[1])) for t in texts)

    frontend = Frontend(ServicePortName(ns, name, "p80", "TCP"), 80, "TCP", (cluster_ip,),
                        node_port or None, external, lb)
    return DesiredPort(frontend, eps(endpoints), affinity,
                       None if external_endpoints is None else eps(external_endpoints))


SVC1 = port("ns1", "svc1", "172.30.0.41", ["10.180.0.1:80"])
SVC2 = port("ns2", "svc2", "172.30.0.42", ["10.180.0.2:80"], node_port=3001,
            external=("192.168.99.22",), lb=("1.2.3.4",), external_endpoints=[])
SVC3 = port("ns3", "svc3", "172.30.0.43", ["10.180.0.3:80"], node_port=3003)
SVC4 = port("ns4", "svc4", "172.30.0.44", ["10.180.0.4:80", "10.180.0.5:80"],
            external=("192.168.99.33",))
SVC5 = port("ns5", "svc5", "172.30.0.45", ["10.180.0.3:80"], node_port=3002, lb=("5.6.7.8",),
            affinity=10800)
SVC6 = port("ns6", "svc6", "172.30.0.46", [])
SERVICES = {ObjectName("ns2", "svc2"): Service("ns2", "svc2", type="LoadBalancer",
                                               external_traffic_policy="Local")}

T = "add rule ip kube-proxy"
EXPECTED = {
    "ns1/svc1:p80": f"""
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
{T} service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
{T} service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }}
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
{T} endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
{T} endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add element ip kube-proxy cluster-ips {{ 172.30.0.41 }}
add element ip kube-proxy service-ips {{ 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }}
""",
    "ns2/svc2:p80": f"""
add chain ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80
{T} service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
{T} service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }}
add chain ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80
{T} external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
{T} external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
{T} external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
add chain ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
{T} endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
{T} endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80
add element ip kube-proxy cluster-ips {{ 172.30.0.42 }}
add element ip kube-proxy service-ips {{ 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }}
add element ip kube-proxy service-ips {{ 192.168.99.22 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }}
add element ip kube-proxy service-ips {{ 1.2.3.4 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }}
add element ip kube-proxy service-nodeports {{ tcp . 3001 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }}
add element ip kube-proxy no-endpoint-nodeports {{ tcp . 3001 comment "ns2/svc2:p80" : drop }}
add element ip kube-proxy no-endpoint-services {{ 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop }}
add element ip kube-proxy no-endpoint-services {{ 192.168.99.22 . tcp . 80 comment "ns2/svc2:p80" : drop }}
""",
    "ns3/svc3:p80": f"""
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
{T} service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
{T} service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }}
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
{T} external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
{T} external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
{T} endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
{T} endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add element ip kube-proxy cluster-ips {{ 172.30.0.43 }}
add element ip kube-proxy service-ips {{ 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }}
add element ip kube-proxy service-nodeports {{ tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }}
""",
    "ns4/svc4:p80": f"""
add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
{T} service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
{T} service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap {{ 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }}
add chain ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80
{T} external-LAUZTJTB-ns4/svc4/tcp/p80 jump mark-for-masquerade
{T} external-LAUZTJTB-ns4/svc4/tcp/p80 goto service-LAUZTJTB-ns4/svc4/tcp/p80
add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
{T} endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade
{T} endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80
add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
{T} endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
{T} endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80
add element ip kube-proxy cluster-ips {{ 172.30.0.44 }}
add element ip kube-proxy service-ips {{ 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }}
add element ip kube-proxy service-ips {{ 192.168.99.33 . tcp . 80 : goto external-LAUZTJTB-ns4/svc4/tcp/p80 }}
""",
    # kube-proxy also writes a firewall chain for svc5's LoadBalancerSourceRanges,
    # which uproxy's model does not carry.
    "ns5/svc5:p80": f"""
add set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}
add chain ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80
{T} service-HVFWP5L3-ns5/svc5/tcp/p80 ip daddr 172.30.0.45 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
{T} service-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
{T} service-HVFWP5L3-ns5/svc5/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 }}
add chain ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80
{T} external-HVFWP5L3-ns5/svc5/tcp/p80 jump mark-for-masquerade
{T} external-HVFWP5L3-ns5/svc5/tcp/p80 goto service-HVFWP5L3-ns5/svc5/tcp/p80
add chain ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
{T} endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
{T} endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 update @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 {{ ip saddr }}
{T} endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add element ip kube-proxy cluster-ips {{ 172.30.0.45 }}
add element ip kube-proxy service-ips {{ 172.30.0.45 . tcp . 80 : goto service-HVFWP5L3-ns5/svc5/tcp/p80 }}
add element ip kube-proxy service-ips {{ 5.6.7.8 . tcp . 80 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }}
add element ip kube-proxy service-nodeports {{ tcp . 3002 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }}
""",
    "ns6/svc6:p80": """
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
""",
}


def blocks(text: str) -> dict[str, Counter[str]]:
    """Each service's lines (after its `# name` line), as a multiset."""
    found: dict[str, Counter[str]] = {}
    current: str | None = None
    for line in text.replace("<pod CIDR>", POD_CIDR).splitlines():
        if line.startswith("# ") and "/" in line and " " not in line[2:]:
            current = line[2:]
            found[current] = Counter()
        elif current is not None and line:
            found[current][line] += 1
    return found


def test_nftables_mode_writes_what_kube_proxy_writes() -> None:
    text = kube_proxy_nftables([SVC1, SVC2, SVC3, SVC4, SVC5, SVC6], SERVICES)
    got = blocks(text)
    for name, expected in EXPECTED.items():
        want = Counter(line for line in expected.strip().splitlines())
        assert got[name] == want, name


def test_nftables_chain_names_are_kube_proxys_hashes() -> None:
    assert nft_chain_base(SVC1) == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert nft_endpoint_base(SVC1, SVC1.endpoints[0]) == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    v6 = DesiredPort(Frontend(ServicePortName("ns1", "svc1", "p80", "TCP"), 80, "TCP",
                              ("fd00::41",)), (Endpoint("fd00::1", 80),))
    assert nft_endpoint_base(v6, v6.endpoints[0]).endswith("__fd00..1/80")


def test_ipv6_services_get_an_ip6_table() -> None:
    v6 = DesiredPort(Frontend(ServicePortName("ns", "six", "", "TCP"), 443, "TCP",
                              ("fd00::10",)), (Endpoint("fd00::1", 8443),))
    text = kube_proxy_nftables([SVC1, v6])
    assert "add table ip6 kube-proxy" in text and "add table ip kube-proxy" in text
    assert "meta l4proto tcp dnat to [fd00::1]:8443" in text
    assert "ip6 daddr fd00::10 ip6 saddr != <pod CIDR> jump mark-for-masquerade" in text


def test_iptables_affinity_and_ladder() -> None:
    assert svc_chain("ns1/svc1:p80", "TCP") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert [probability(n) for n in (3, 2)] == ["0.3333333333", "0.5000000000"]


def test_ipvs_keeps_affinity_as_persistence() -> None:
    text = kube_proxy_ipvs([SVC5])
    assert "ipvsadm -A -t 172.30.0.45:80 -s rr -p 10800" in text
    assert "ipvsadm -A -t <node IP>:3002 -s rr -p 10800  (one per node address)" in text


def test_iptables_mode_sends_outside_traffic_through_kube_ext() -> None:
    text = kube_proxy_iptables([SVC2, SVC3], SERVICES)
    ext2, svc2 = ext_chain("ns2/svc2:p80", "tcp"), svc_chain("ns2/svc2:p80", "tcp")
    # externalTrafficPolicy Local without local endpoints: pods and the node
    # short-circuit to the cluster endpoints, everyone else is dropped.
    assert (f'-A {ext2} -s <pod CIDR> -m comment --comment "pod traffic for ns2/svc2:p80 '
            f'external destinations" -j {svc2}') in text
    assert (f'-A {ext2} -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external '
            f'destinations" -m addrtype --src-type LOCAL -j {svc2}') in text
    assert ('-A KUBE-EXTERNAL-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment '
            '"ns2/svc2:p80 has no local endpoints" -m tcp --dport 80 -j DROP') in text
    assert f"-A {ext2} -j KUBE-SVL" not in text
    # Cluster policy: masquerade, then the service's endpoints.
    ext3, svc3 = ext_chain("ns3/svc3:p80", "tcp"), svc_chain("ns3/svc3:p80", "tcp")
    assert f'-A KUBE-NODEPORTS -p tcp -m comment --comment "ns3/svc3:p80" -m tcp --dport 3003 -j {ext3}' in text
    assert f"-A {ext3} -j {svc3}" in text
    assert text.rstrip().endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
