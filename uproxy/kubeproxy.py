"""What kube-proxy's modes would program for the same service ports (pure text).

`uproxy explain --compare` prints these beside uproxy's own rules, so the
modes can be read side by side: iptables (one chain per service and per
endpoint, a `statistic` ladder), IPVS (a virtual server per address,
scheduler rr) and nftables (GA in Kubernetes 1.33: verdict maps and
`numgen`). Chain names are kube-proxy's own hashes. Values that depend on
the cluster and not on the services are written as placeholders in angle
brackets: `<pod CIDR>`, `<service CIDR>`, `<node IP>`.

The renderings follow kube-proxy's own test expectations
(pkg/proxy/{iptables,ipvs,nftables}); they leave out what does not depend on
the services (conntrack cleanup, the IPVS dummy interface's housekeeping,
LoadBalancerSourceRanges firewalls).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence

from uproxy.model import DesiredPort, Endpoint, ObjectName, Service, format_hostport

MASQ_MARK = "0x4000/0x4000"
POD_CIDR = "<pod CIDR>"
SERVICE_CIDR = "<service CIDR>"
NODE_IP = "<node IP>"

Services = Mapping[ObjectName, Service]


# --- iptables mode -------------------------------------------------------------------


def kube_hash(text: str) -> str:
    """kube-proxy's chain-name hash: base32(sha256(text)) cut to 16 characters."""
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def svc_chain(port_name: str, protocol: str) -> str:
    """KUBE-SVC-<hash>, as kube-proxy's servicePortChainName."""
    return "KUBE-SVC-" + kube_hash(port_name + protocol.lower())


def sep_chain(port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-<hash>, as kube-proxy's servicePortEndpointChainName."""
    return "KUBE-SEP-" + kube_hash(port_name + protocol.lower() + endpoint)


def probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"


def ext_chain(port_name: str, protocol: str) -> str:
    """KUBE-EXT-<hash>: where traffic from outside (node port, external and LB IPs) goes."""
    return "KUBE-EXT-" + kube_hash(port_name + protocol.lower())


def svl_chain(port_name: str, protocol: str) -> str:
    """KUBE-SVL-<hash>: the endpoints of traffic policy Local."""
    return "KUBE-SVL-" + kube_hash(port_name + protocol.lower())


def _balance(chain: str, name: str, proto: str, endpoints: Sequence[Endpoint],
             timeout: float | None) -> list[str]:
    """A KUBE-SVC/KUBE-SVL chain's picks: affinity checks, then the statistic ladder."""
    lines = []
    if timeout is not None:  # a pinned client goes back to its endpoint first
        for endpoint in endpoints:
            sep = sep_chain(name, proto, str(endpoint))
            lines.append(f'-A {chain} -m comment --comment "{name} -> {endpoint}" -m recent '
                         f"--name {sep} --rcheck --seconds {timeout:g} --reap -j {sep}")
    total = len(endpoints)
    for index, endpoint in enumerate(endpoints):
        sep = sep_chain(name, proto, str(endpoint))
        left = total - index
        chance = (f"-m statistic --mode random --probability {probability(left)} "
                  if left > 1 else "")
        lines.append(f'-A {chain} -m comment --comment "{name} -> {endpoint}" {chance}-j {sep}')
    return lines


def _iptables_port(port: DesiredPort, services: Services) -> list[str]:
    frontend = port.frontend
    name = str(frontend.name)
    proto = frontend.protocol.lower()
    svc, ext, svl = (svc_chain(name, proto), ext_chain(name, proto), svl_chain(name, proto))
    internal_local, external_local = _policies(port, services)
    local = list(port.external_endpoints if port.external_endpoints is not None
                 else port.endpoints)
    every = sorted(set(port.endpoints) | set(local))
    dport = f"-m {proto} --dport {frontend.port}"
    lines: list[str] = []
    if not every:
        for address in frontend.addresses:
            bits = 128 if ":" in address else 32
            chain = ("KUBE-SERVICES" if address in frontend.cluster_ips
                     else "KUBE-EXTERNAL-SERVICES")
            lines.append(f"-A {chain} -d {address}/{bits} -p {proto} -m comment --comment "
                         f'"{name} has no endpoints" {dport} -j REJECT  (filter table)')
        if frontend.node_port:
            lines.append(f'-A KUBE-EXTERNAL-SERVICES -p {proto} -m comment --comment "{name} has '
                         f'no endpoints" -m addrtype --dst-type LOCAL -m {proto} --dport '
                         f"{frontend.node_port} -j REJECT  (filter table)")
        return lines
    internal = svl if internal_local else svc
    for address in frontend.cluster_ips:
        bits = 128 if ":" in address else 32
        lines.append(f"-A KUBE-SERVICES -d {address}/{bits} -p {proto} -m comment --comment "
                     f'"{name} cluster IP" {dport} -j {internal}')
        lines.append(f"-A {internal} ! -s {POD_CIDR} -d {address}/{bits} -p {proto} -m comment "
                     f'--comment "{name} cluster IP" {dport} -j KUBE-MARK-MASQ')
    outside = ([(a, "external IP") for a in frontend.external_ips]
               + [(a, "loadbalancer IP") for a in frontend.load_balancer_ips])
    for address, kind in outside:
        bits = 128 if ":" in address else 32
        lines.append(f"-A KUBE-SERVICES -d {address}/{bits} -p {proto} -m comment --comment "
                     f'"{name} {kind}" {dport} -j {ext}')
    if frontend.node_port:
        lines.append(f'-A KUBE-NODEPORTS -p {proto} -m comment --comment "{name}" -m {proto} '
                     f"--dport {frontend.node_port} -j {ext}")
    if outside or frontend.node_port:
        if external_local:
            short = svl if internal_local else svc
            lines += [
                f'-A {ext} -s {POD_CIDR} -m comment --comment "pod traffic for {name} external '
                f'destinations" -j {short}',
                f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {name} external '
                'destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ',
                f'-A {ext} -m comment --comment "route LOCAL traffic for {name} external '
                f'destinations" -m addrtype --src-type LOCAL -j {short}',
            ]
            if local:
                lines.append(f"-A {ext} -j {svl}")
            else:  # outside traffic that was not short-circuited is dropped
                why = f'-m comment --comment "{name} has no local endpoints"'
                for address, _ in outside:
                    bits = 128 if ":" in address else 32
                    lines.append(f"-A KUBE-EXTERNAL-SERVICES -d {address}/{bits} -p {proto} "
                                 f"{why} {dport} -j DROP  (filter table)")
                if frontend.node_port:
                    lines.append(f"-A KUBE-EXTERNAL-SERVICES -p {proto} {why} -m addrtype "
                                 f"--dst-type LOCAL -m {proto} --dport {frontend.node_port} "
                                 "-j DROP  (filter table)")
        else:
            lines += [f'-A {ext} -m comment --comment "masquerade traffic for {name} external '
                      'destinations" -j KUBE-MARK-MASQ', f"-A {ext} -j {svc}"]
    if not internal_local or not external_local:
        lines += _balance(svc, name, proto, port.endpoints, port.affinity_timeout)
    if (internal_local or external_local) and local:
        lines += _balance(svl, name, proto, local, port.affinity_timeout)
    for endpoint in every:
        lines += _sep_rules(sep_chain(name, proto, str(endpoint)), name, proto, endpoint,
                            pinned=port.affinity_timeout is not None)
    return lines


def kube_proxy_iptables(ports: Sequence[DesiredPort], services: Services | None = None) -> str:
    """What kube-proxy's iptables mode would program (nat table, IPv4 and IPv6 alike,
    as iptables-save prints it; `(filter table)` marks the rules that live there)."""
    lines = [
        "# kube-proxy --proxy-mode=iptables (nat table)",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" "
        "-j KUBE-POSTROUTING",
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring "
        "SNAT\" -j MASQUERADE --random-fully",
    ]
    for port in sorted(ports, key=lambda p: p.name):
        lines += _iptables_port(port, services or {})
    lines.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                 'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                 "-j KUBE-NODEPORTS")
    return "\n".join(lines) + "\n"


def _sep_rules(sep: str, name: str, proto: str, endpoint: Endpoint, *,
               pinned: bool) -> list[str]:
    bits = 128 if ":" in endpoint.ip else 32
    recent = f"-m recent --name {sep} --set " if pinned else ""
    return [
        f'-A {sep} -s {endpoint.ip}/{bits} -m comment --comment "{name}" -j KUBE-MARK-MASQ',
        f'-A {sep} -p {proto} -m comment --comment "{name}" {recent}-m {proto} '
        f"-j DNAT --to-destination {endpoint}",
    ]


# --- IPVS mode -----------------------------------------------------------------------


def kube_proxy_ipvs(ports: Sequence[DesiredPort]) -> str:
    """What kube-proxy's IPVS mode would program: addresses, virtual servers, ipsets."""
    lines = [
        "# kube-proxy --proxy-mode=ipvs (deprecated since Kubernetes 1.35)",
        "ip link add kube-ipvs0 type dummy",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
        "-A KUBE-POSTROUTING -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
    ]
    for port in sorted(ports, key=lambda p: p.name):
        frontend = port.frontend
        proto = frontend.protocol.lower()
        flag = "-t" if proto == "tcp" else "-u"
        persistence = (f" -p {port.affinity_timeout:g}" if port.affinity_timeout is not None
                       else "")
        lines.append(f"# {frontend.name}")
        for address in frontend.addresses:
            bits = 128 if ":" in address else 32
            vip = format_hostport(address, frontend.port)
            lines.append(f"ip addr add {address}/{bits} dev kube-ipvs0")
            if address in frontend.cluster_ips:
                lines.append(f"ipset add KUBE-CLUSTER-IP {address},{proto}:{frontend.port}")
            else:
                lines.append(f"ipset add KUBE-EXTERNAL-IP {address},{proto}:{frontend.port}")
            lines.append(f"ipvsadm -A {flag} {vip} -s rr{persistence}")
            for endpoint in port.endpoints:
                lines.append(f"ipvsadm -a {flag} {vip} -r {endpoint} -m -w 1")
        if frontend.node_port:
            lines.append(f"ipset add KUBE-NODE-PORT-{proto.upper()} {frontend.node_port}")
            lines.append(f"ipvsadm -A {flag} {NODE_IP}:{frontend.node_port} -s rr{persistence}"
                         "  (one per node address)")
        for endpoint in port.endpoints:
            lines.append(f"ipset add KUBE-LOOP-BACK "
                         f"{endpoint.ip},{proto}:{endpoint.port},{endpoint.ip}")
    return "\n".join(lines) + "\n"


# --- nftables mode -------------------------------------------------------------------


def _hashed(name: str) -> str:
    """kube-proxy's nftables chain base: 8 characters of hash, then the name."""
    digest = hashlib.sha256(name.encode()).digest()
    based = base64.b32encode(digest).decode()[:8] + "-" + name
    return based if len(based) <= 112 else based[:109] + "..."


def nft_chain_base(port: DesiredPort) -> str:
    """servicePortChainNameBase: HASH-namespace/name/protocol/portname."""
    name = port.name
    return _hashed(f"{name.namespace}/{name.name}/{port.frontend.protocol.lower()}/{name.port}")


def nft_endpoint_base(port: DesiredPort, endpoint: Endpoint) -> str:
    """servicePortEndpointChainNameBase: ...__IP/port, an IPv6 IP's colons as dots."""
    name = port.name
    return _hashed(f"{name.namespace}/{name.name}/{port.frontend.protocol.lower()}/"
                   f"{name.port}__{endpoint.ip.replace(':', '.')}/{endpoint.port}")


def _nft_base(family: int) -> list[str]:
    ip, addr = ("ip6", "ipv6_addr") if family == 6 else ("ip", "ipv4_addr")
    table = f"{ip} kube-proxy"
    return [
        f'add table {table} {{ comment "rules for kube-proxy" ; }}',
        f'add set {table} cluster-ips {{ type {addr} ; comment "Active ClusterIPs" ; }}',
        f'add set {table} nodeport-ips {{ type {addr} ; comment "IPs that accept NodePort '
        'traffic" ; }',
        f"add map {table} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        f"add map {table} no-endpoint-services {{ type {addr} . inet_proto . inet_service : "
        'verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }',
        f"add map {table} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; "
        'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        f"add map {table} service-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "NodePort traffic" ; }',
        f"add chain {table} cluster-ips-check",
        f"add chain {table} filter-forward {{ type filter hook forward priority 0 ; }}",
        f"add chain {table} filter-input {{ type filter hook input priority 0 ; }}",
        f"add chain {table} filter-output {{ type filter hook output priority 0 ; }}",
        f"add chain {table} mark-for-masquerade",
        f"add chain {table} masquerading",
        f"add chain {table} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {table} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {table} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {table} nodeport-endpoints-check",
        f'add chain {table} reject-chain {{ comment "helper for @no-endpoint-services / '
        '@no-endpoint-nodeports" ; }',
        f"add chain {table} services",
        f"add chain {table} service-endpoints-check",
        f"add rule {table} cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject "
        'traffic to invalid ports of ClusterIPs"',
        f"add rule {table} cluster-ips-check {ip} daddr {{ {SERVICE_CIDR} }} drop comment "
        '"Drop traffic to unallocated ClusterIPs"',
        f"add rule {table} filter-forward ct state new jump service-endpoints-check",
        f"add rule {table} filter-forward ct state new jump cluster-ips-check",
        f"add rule {table} filter-input ct state new jump nodeport-endpoints-check",
        f"add rule {table} filter-input ct state new jump service-endpoints-check",
        f"add rule {table} filter-output ct state new jump service-endpoints-check",
        f"add rule {table} filter-output ct state new jump cluster-ips-check",
        f"add rule {table} mark-for-masquerade mark set mark or 0x4000",
        f"add rule {table} masquerading mark and 0x4000 == 0 return",
        f"add rule {table} masquerading mark set mark xor 0x4000",
        f"add rule {table} masquerading masquerade fully-random",
        f"add rule {table} nat-output jump services",
        f"add rule {table} nat-postrouting jump masquerading",
        f"add rule {table} nat-prerouting jump services",
        f"add rule {table} nodeport-endpoints-check {ip} daddr @nodeport-ips meta l4proto . "
        "th dport vmap @no-endpoint-nodeports",
        f"add rule {table} reject-chain reject",
        f"add rule {table} services {ip} daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {table} services {ip} daddr @nodeport-ips meta l4proto . th dport vmap "
        "@service-nodeports",
        f"add rule {table} service-endpoints-check {ip} daddr . meta l4proto . th dport vmap "
        "@no-endpoint-services",
        f"add element {table} nodeport-ips {{ {NODE_IP} }}",
    ]


def _family_of(address: str) -> int:
    return 6 if ":" in address else 4


def _policies(port: DesiredPort, services: Services) -> tuple[bool, bool]:
    """(internalTrafficPolicy Local, externalTrafficPolicy Local) of a port's service."""
    service = services.get(port.name.service)
    if service is None:
        return False, False
    return (service.internal_traffic_policy == "Local",
            service.external_traffic_policy == "Local")


def _dispatch(table: str, ip: str, chain: str, endpoints: Sequence[Endpoint],
              port: DesiredPort) -> list[str]:
    """A policy chain's rules: affinity checks, then one random pick."""
    lines: list[str] = []
    if port.affinity_timeout is not None:
        for endpoint in endpoints:
            base = nft_endpoint_base(port, endpoint)
            lines.append(f"add rule {table} {chain} {ip} saddr @affinity-{base} "
                         f"goto endpoint-{base}")
    arms = " , ".join(f"{index} : goto endpoint-{nft_endpoint_base(port, endpoint)}"
                      for index, endpoint in enumerate(endpoints))
    lines.append(f"add rule {table} {chain} numgen random mod {len(endpoints)} vmap {{ {arms} }}")
    return lines


def _nft_port(port: DesiredPort, family: int, services: Services) -> list[str]:
    """One service port's chains and map elements in one family's table."""
    ip, addr = ("ip6", "ipv6_addr") if family == 6 else ("ip", "ipv4_addr")
    table = f"{ip} kube-proxy"
    frontend = port.frontend
    proto = frontend.protocol.lower()
    name = str(frontend.name)
    base = nft_chain_base(port)
    cluster_ips = [a for a in frontend.cluster_ips if _family_of(a) == family]
    outside = [a for a in frontend.external_ips + frontend.load_balancer_ips
               if _family_of(a) == family]
    internal_local, external_local = _policies(port, services)
    accessible = bool(outside or frontend.node_port)
    mine = [e for e in port.endpoints if e.family == family]
    local = [e for e in (port.external_endpoints if port.external_endpoints is not None
                         else port.endpoints) if e.family == family]
    cluster = mine  # what the planner chose for cluster-IP traffic
    every = sorted(set(mine) | set(local))
    lines = [f"# {name}"]
    if not every:  # no endpoints anywhere: reject at the filter hooks, no chains
        lines += [f"add element {table} cluster-ips {{ {a} }}" for a in cluster_ips]
        for address in cluster_ips + outside:
            lines.append(f"add element {table} no-endpoint-services {{ {address} . {proto} . "
                         f'{frontend.port} comment "{name}" : goto reject-chain }}')
        if frontend.node_port:
            lines.append(f"add element {table} no-endpoint-nodeports {{ {proto} . "
                         f'{frontend.node_port} comment "{name}" : goto reject-chain }}')
        return lines
    if port.affinity_timeout is not None:
        for endpoint in every:
            lines.append(f"add set {table} affinity-{nft_endpoint_base(port, endpoint)} "
                         f"{{ type {addr} ; flags dynamic,timeout ; "
                         f"timeout {port.affinity_timeout:g}s ; }}")
    service_chain = f"service-{base}"
    local_chain = f"local-{base}"
    external_chain = f"external-{base}"
    if not internal_local or not external_local:
        lines.append(f"add chain {table} {service_chain}")
        for address in cluster_ips:
            lines.append(f"add rule {table} {service_chain} {ip} daddr {address} {ip} saddr != "
                         f"{POD_CIDR} jump mark-for-masquerade")
        lines += _dispatch(table, ip, service_chain, cluster, port)
    if (internal_local or external_local) and local:
        lines.append(f"add chain {table} {local_chain}")
        lines += _dispatch(table, ip, local_chain, local, port)
    if accessible:
        lines.append(f"add chain {table} {external_chain}")
        if external_local:
            short = service_chain if not internal_local else local_chain
            lines += [
                f"add rule {table} {external_chain} {ip} saddr {POD_CIDR} goto {short} "
                'comment "short-circuit pod traffic"',
                f"add rule {table} {external_chain} fib saddr type local jump "
                'mark-for-masquerade comment "masquerade local traffic"',
                f"add rule {table} {external_chain} fib saddr type local goto {short} "
                'comment "short-circuit local traffic"',
            ]
            if local:
                lines.append(f"add rule {table} {external_chain} goto {local_chain}")
        else:
            lines += [f"add rule {table} {external_chain} jump mark-for-masquerade",
                      f"add rule {table} {external_chain} goto {service_chain}"]
    for endpoint in every:
        chain = f"endpoint-{nft_endpoint_base(port, endpoint)}"
        target = f"[{endpoint.ip}]:{endpoint.port}" if family == 6 else str(endpoint)
        lines.append(f"add chain {table} {chain}")
        lines.append(f"add rule {table} {chain} {ip} saddr {endpoint.ip} "
                     "jump mark-for-masquerade")
        if port.affinity_timeout is not None:
            lines.append(f"add rule {table} {chain} update @affinity-"
                         f"{nft_endpoint_base(port, endpoint)} {{ {ip} saddr }}")
        lines.append(f"add rule {table} {chain} meta l4proto {proto} dnat to {target}")
    internal_target = local_chain if internal_local else service_chain
    for address in cluster_ips:
        lines.append(f"add element {table} cluster-ips {{ {address} }}")
        if internal_local and not local:
            lines.append(f"add element {table} no-endpoint-services {{ {address} . {proto} . "
                         f'{frontend.port} comment "{name}" : drop }}')
        else:
            lines.append(f"add element {table} service-ips {{ {address} . {proto} . "
                         f"{frontend.port} : goto {internal_target} }}")
    for address in outside:
        lines.append(f"add element {table} service-ips {{ {address} . {proto} . "
                     f"{frontend.port} : goto {external_chain} }}")
    if frontend.node_port:
        lines.append(f"add element {table} service-nodeports {{ {proto} . "
                     f"{frontend.node_port} : goto {external_chain} }}")
    if external_local and not local:  # traffic from outside is dropped; pods short-circuit
        if frontend.node_port:
            lines.append(f"add element {table} no-endpoint-nodeports {{ {proto} . "
                         f'{frontend.node_port} comment "{name}" : drop }}')
        for address in outside:
            lines.append(f"add element {table} no-endpoint-services {{ {address} . {proto} . "
                         f'{frontend.port} comment "{name}" : drop }}')
    return lines


def kube_proxy_nftables(ports: Sequence[DesiredPort], services: Services | None = None) -> str:
    """What kube-proxy's nftables mode would program, as `nft -f` input (one table
    per IP family). `services` gives the traffic policies (Cluster without it)."""
    services = services or {}
    families = sorted({_family_of(a) for p in ports for a in p.frontend.addresses}
                      | {e.family for p in ports for e in p.endpoints} or {4})
    lines = [f"# kube-proxy --proxy-mode=nftables (GA since Kubernetes 1.33); {POD_CIDR}, "
             f"{SERVICE_CIDR} and {NODE_IP} stand for your cluster's values"]
    for family in families:
        lines += _nft_base(family)
        for port in sorted(ports, key=lambda p: p.name):
            in_family = any(_family_of(a) == family for a in port.frontend.addresses) or (
                not port.frontend.addresses and family == families[0])
            if in_family:
                lines += ["", *_nft_port(port, family, services)]
    return "\n".join(lines) + "\n"


# --- the modes side by side ----------------------------------------------------------


def _ladder(total: int) -> str:
    """The iptables statistic probabilities of `total` endpoints, in rule order."""
    steps = [f"1/{left} ({probability(left)})" for left in range(total, 1, -1)]
    return ", ".join(steps) + ", then the last rule takes the rest" if steps else (
        "one rule, no statistic match")


def how_they_compare(ports: Sequence[DesiredPort]) -> str:
    """Short text linking the dumps: where the choice happens, affinity, and cost."""
    lines = [
        "# How a packet reaches an endpoint, mode by mode",
        "#",
        "# uproxy (userspace): a nat rule sends the connection to a listener of uproxy's;",
        "#   uproxy accepts it, its balancer picks an endpoint (round-robin over a shuffled",
        "#   list), uproxy dials it and copies the bytes both ways. The pick is per",
        "#   connection (per session for UDP), in Python, after the handshake.",
        "# kube-proxy iptables: KUBE-SERVICES matches the address, KUBE-SVC-* picks with",
        "#   `statistic --mode random` rules tried in order, KUBE-SEP-* DNATs to the pod. The",
        "#   kernel decides on the first packet; conntrack carries the rest.",
        "# kube-proxy IPVS: the address is local (kube-ipvs0); the IPVS virtual server",
        "#   schedules round-robin (rr) over real servers and NATs (Masq); iptables is left",
        "#   for masquerading (KUBE-LOOP-BACK, hairpin traffic).",
        "# kube-proxy nftables: one map lookup (@service-ips, a verdict map) finds the",
        "#   service chain; `numgen random mod N vmap` picks an endpoint chain in one step,",
        "#   however many endpoints there are; the endpoint chain DNATs.",
    ]
    for port in sorted(ports, key=lambda p: p.name):
        endpoints = port.endpoints
        lines.append("#")
        if not endpoints:
            lines += [f"# {port.name}: no endpoints. uproxy refuses TCP (reset) and drops "
                      "UDP; kube-proxy",
                      "#   rejects at the filter hooks (iptables REJECT, nftables "
                      "@no-endpoint-services ->", "#   reject-chain); IPVS has a virtual "
                      "server without real servers."]
            continue
        total = len(endpoints)
        share = ("every new connection" if total == 1
                 else f"each takes 1/{total} of new connections")
        lines += [
            f"# {port.name}: {total} endpoint{'s' if total != 1 else ''}, {share}",
            f"#   uproxy:   round-robin in the listener: {', '.join(map(str, endpoints))}, "
            "in turn",
            f"#   iptables: {_ladder(total)}",
            f"#   IPVS:     rr over {total} real server{'s' if total != 1 else ''}",
            f"#   nftables: numgen random mod {total}: one random number, one map lookup",
        ]
        if port.affinity_timeout is not None:
            seconds = f"{port.affinity_timeout:g}"
            lines += [
                f"#   ClientIP affinity ({seconds} s): uproxy pins the client IP in its "
                "balancer; iptables",
                f"#   checks `-m recent --rcheck --seconds {seconds}` per endpoint before "
                "the statistic rules;",
                f"#   IPVS keeps persistence (-p {seconds}); nftables checks a dynamic set "
                "per endpoint",
                f"#   (flags dynamic,timeout; timeout {seconds}s) before numgen.",
            ]
    lines += [
        "#",
        "# Why kube-proxy retired its userspace mode (removed in Kubernetes 1.26): every",
        "# byte of every connection crosses into the proxy process and back out, so its",
        "# cost grows with traffic; the kernel modes pay once per connection (NAT on the",
        "# first packet) and conntrack forwards the rest without leaving the kernel. uproxy",
        "# keeps the userspace path for what it buys: no privileges in laptop mode, a retry",
        "# on another endpoint when a dial fails, the PROXY protocol header, per-connection",
        "# counters, and splice(2) so bulk bytes are not copied through Python.",
    ]
    return "\n".join(lines) + "\n"
