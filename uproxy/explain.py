"""`uproxy explain`: what the classic mode installs, and the path of a packet.

Pure text from the desired ports and their portals; touches nothing. With
`compare=True` it also prints what kube-proxy's iptables and IPVS modes would
program for the same services, so the three can be read side by side.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from uproxy.model import DesiredPort, Endpoint, format_hostport
from uproxy.rules.base import Portal, Rules
from uproxy.rules.render import portal_entries, portal_hop

MASQ_MARK = "0x4000/0x4000"


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


def _listener(portal: Portal) -> str:
    return format_hostport(portal.proxy_ip or "0.0.0.0", portal.proxy_port)


def _endpoints(port: DesiredPort | None) -> str:
    if port is None or not port.endpoints:
        return "no endpoints: TCP is refused, UDP dropped"
    text = ", ".join(str(e) for e in port.endpoints)
    affinity = (f"; ClientIP affinity for {port.affinity_timeout:g}s"
                if port.affinity_timeout is not None else "")
    return f"round-robin over {text}{affinity}"


def explain_paths(ports: Sequence[DesiredPort], portals: Sequence[Portal], rules: Rules,
                  prefix: str) -> str:
    by_name = {p.name: p for p in ports}
    lines = [f"# Packet paths ({rules.name} backend)"]
    for portal in sorted(portals, key=lambda p: p.frontend.name):
        frontend = portal.frontend
        lines.append(f"{frontend.name} {frontend.port}/{frontend.protocol} "
                     f"-> listener {_listener(portal)}")
        entries = portal_entries([portal])
        if rules.name == "none":
            lines.append(f"  clients connect to {_listener(portal)} directly")
        if not entries and rules.name != "none":
            lines.append("  no clusterIP, node port, external or load-balancer IP: no rule "
                         "steers traffic here (laptop mode, --bind-range, gives it an IP)")
        for entry in entries:
            target = (f"{entry.address}:{entry.port}" if entry.kind == "portal"
                      else f"node port {entry.port} on any local address")
            if entry.family == 6 and entry.address is not None:
                target = format_hostport(entry.address, entry.port)
            lines.append(f"  {target}")
            lines.append("    from another host or pod: "
                         f"{portal_hop(rules.name, prefix, entry, 'container')}")
            lines.append("    from this host:           "
                         f"{portal_hop(rules.name, prefix, entry, 'host')}")
        lines.append(f"  then the listener dials: {_endpoints(by_name.get(frontend.name))}")
    return "\n".join(lines) + "\n"


def kube_proxy_iptables(ports: Sequence[DesiredPort]) -> str:
    """What kube-proxy's iptables mode would program (nat table, IPv4 and IPv6 alike)."""
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
        frontend = port.frontend
        name = str(frontend.name)
        proto = frontend.protocol.lower()
        svc = svc_chain(name, proto)
        match = f"-p {proto} -m {proto} --dport {frontend.port}"
        for address in frontend.addresses:
            bits = 128 if ":" in address else 32
            lines.append(f'-A KUBE-SERVICES -d {address}/{bits} {match} '
                         f'-m comment --comment "{name}" -j {svc}')
        if frontend.node_port:
            lines.append(f'-A KUBE-NODEPORTS -p {proto} -m {proto} --dport {frontend.node_port} '
                         f'-m comment --comment "{name}" -j KUBE-MARK-MASQ')
            lines.append(f'-A KUBE-NODEPORTS -p {proto} -m {proto} --dport {frontend.node_port} '
                         f'-m comment --comment "{name}" -j {svc}')
        if not port.endpoints:
            lines.append(f'-A KUBE-SERVICES {match} -m comment --comment "{name} has no '
                         'endpoints" -j REJECT  (filter table)')
            continue
        total = len(port.endpoints)
        for index, endpoint in enumerate(port.endpoints):
            sep = sep_chain(name, proto, str(endpoint))
            left = total - index
            chance = (f"-m statistic --mode random --probability {probability(left)} "
                      if left > 1 else "")
            lines.append(f'-A {svc} -m comment --comment "{name} -> {endpoint}" {chance}-j {sep}')
            lines += _sep_rules(sep, name, proto, endpoint)
    return "\n".join(lines) + "\n"


def _sep_rules(sep: str, name: str, proto: str, endpoint: Endpoint) -> list[str]:
    bits = 128 if ":" in endpoint.ip else 32
    return [
        f'-A {sep} -s {endpoint.ip}/{bits} -m comment --comment "{name}" -j KUBE-MARK-MASQ',
        f'-A {sep} -p {proto} -m comment --comment "{name}" -m {proto} '
        f"-j DNAT --to-destination {endpoint}",
    ]


def kube_proxy_ipvs(ports: Sequence[DesiredPort]) -> str:
    """What kube-proxy's IPVS mode would program: addresses, virtual servers, ipsets."""
    lines = [
        "# kube-proxy --proxy-mode=ipvs",
        "ip link add kube-ipvs0 type dummy",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
        "-A KUBE-POSTROUTING -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
    ]
    for port in sorted(ports, key=lambda p: p.name):
        frontend = port.frontend
        proto = frontend.protocol.lower()
        flag = "-t" if proto == "tcp" else "-u"
        lines.append(f"# {frontend.name}")
        for address in frontend.addresses:
            bits = 128 if ":" in address else 32
            vip = format_hostport(address, frontend.port)
            lines.append(f"ip addr add {address}/{bits} dev kube-ipvs0")
            if address in frontend.cluster_ips:
                lines.append(f"ipset add KUBE-CLUSTER-IP {address},{proto}:{frontend.port}")
            else:
                lines.append(f"ipset add KUBE-EXTERNAL-IP {address},{proto}:{frontend.port}")
            lines.append(f"ipvsadm -A {flag} {vip} -s rr")
            for endpoint in port.endpoints:
                lines.append(f"ipvsadm -a {flag} {vip} -r {endpoint} -m -w 1")
        if frontend.node_port:
            lines.append(f"ipset add KUBE-NODE-PORT-{proto.upper()} {frontend.node_port}")
            lines.append(f"ipvsadm -A {flag} NODEIP:{frontend.node_port} -s rr  "
                         "(one per node address)")
        for endpoint in port.endpoints:
            lines.append(f"ipset add KUBE-LOOP-BACK "
                         f"{endpoint.ip},{proto}:{endpoint.port},{endpoint.ip}")
    return "\n".join(lines) + "\n"


def explain(
    ports: Sequence[DesiredPort],
    portals: Sequence[Portal],
    rules: Rules,
    *,
    prefix: str = "UPROXY",
    compare: bool = False,
) -> str:
    """The rules `rules` would install, the path per service port, and optionally kube-proxy's."""
    unaddressed = sorted({str(p.name.service) for p in ports if not p.frontend.cluster_ips})
    parts = [f"# No clusterIP: {', '.join(unaddressed)} (rules mode installs no portal for "
             "a service without one; laptop mode gives each service an IP from --bind-range)",
             ""] if unaddressed else []
    parts += [
        f"# Rules the {rules.name} backend installs",
        rules.render(portals).rstrip("\n"),
        "",
        explain_paths(ports, portals, rules, prefix).rstrip("\n"),
    ]
    if compare:
        parts += ["", kube_proxy_iptables(ports).rstrip("\n"),
                  "", kube_proxy_ipvs(ports).rstrip("\n")]
    return "\n".join(parts) + "\n"
