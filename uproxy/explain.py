"""`uproxy explain`: what the classic mode installs, and the path of a packet.

Pure text from the desired ports and their portals; touches nothing. With
`compare=True` it also prints what kube-proxy's iptables, IPVS and nftables
modes would program for the same services (`uproxy.kubeproxy`) and a short
text that links the four, so they can be read side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from uproxy.kubeproxy import (
    how_they_compare,
    kube_proxy_iptables,
    kube_proxy_ipvs,
    kube_proxy_nftables,
)
from uproxy.model import DesiredPort, ObjectName, Service, format_hostport
from uproxy.rules.base import Portal, Rules
from uproxy.rules.render import portal_entries, portal_hop


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


def explain(
    ports: Sequence[DesiredPort],
    portals: Sequence[Portal],
    rules: Rules,
    *,
    prefix: str = "UPROXY",
    compare: bool = False,
    services: Mapping[ObjectName, Service] | None = None,
    examples: Mapping[ObjectName, str] | None = None,
) -> str:
    """The rules `rules` would install, the path per service port, and optionally
    kube-proxy's. `examples`: services that have no clusterIP, and the example
    address they were given here; `services` gives traffic policies to --compare."""
    unaddressed = sorted({str(p.name.service) for p in ports if not p.frontend.cluster_ips})
    parts = [f"# No clusterIP: {', '.join(unaddressed)} (rules mode installs no portal for "
             "a service without one; laptop mode gives each service an IP from --bind-range)",
             ""] if unaddressed else []
    if examples:
        width = max(len(str(name)) for name in examples)
        parts += ["# Example addresses: these services have no clusterIP (laptop mode gives "
                  "each one an IP", "# from --bind-range); to show what rules mode would do, "
                  "they get made-up ones here:"]
        parts += [f"#   {name!s:<{width}}  {ip}" for name, ip in sorted(examples.items())]
        parts.append("")
    if portals and rules.name != "none":
        ports_used = sorted(p.proxy_port for p in portals)
        shown = (f"{ports_used[0]}" if len(ports_used) == 1
                 else f"{ports_used[0]}-{ports_used[-1]}")
        parts += [f"# Placeholder ports: the proxy ports here ({shown}) are placeholders; a "
                  "running uproxy", "# takes free ones from --proxy-port-range, and /status "
                  "shows the real ones.", ""]
    parts += [
        f"# Rules the {rules.name} backend installs",
        rules.render(portals).rstrip("\n"),
        "",
        explain_paths(ports, portals, rules, prefix).rstrip("\n"),
    ]
    if compare:
        parts += ["", how_they_compare(ports).rstrip("\n"),
                  "", kube_proxy_iptables(ports, services).rstrip("\n"),
                  "", kube_proxy_ipvs(ports).rstrip("\n"),
                  "", kube_proxy_nftables(ports, services).rstrip("\n")]
    return "\n".join(parts) + "\n"
