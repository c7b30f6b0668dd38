"""`uproxy explain --services F [--rules B] [--compare]`: print what uproxy
would do for a services file, without root and without touching the kernel.

Proxy ports are assigned in order from the start of --proxy-port-range (or
from 30000), so the output is the same on every run; the output says they
are placeholders. A service without a clusterIP (the short form's default,
for laptop mode) gets an example address from EXAMPLE_ADDRESSES so the rules
and --compare have something to show; the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uproxy.commands.arguments import (
    RULE_BACKENDS,
    UsageError,
    chain_prefix,
    ip,
    typed,
)
from uproxy.durations import PortRange, parse_port_range
from uproxy.model import DesiredPort, ObjectName
from uproxy.rules.base import Portal

DEFAULT_PORTS = PortRange(30000, 32767)
# Example cluster IPs for services without one: kubeadm's default service CIDR.
EXAMPLE_ADDRESSES = ipaddress.ip_network("10.96.0.0/12")
EXAMPLE_FIRST = 100  # 10.96.0.100 onwards: clear of .1 (kubernetes) and .10 (DNS)
DESCRIPTION = ("Print the rules a backend would install for a services file and the path a "
               "packet takes to each service port. Needs no root; touches nothing.")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The `explain` subcommand on the main parser's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "explain", help="print the rules and packet paths for a services file",
        description=DESCRIPTION)
    parser.add_argument("--services", metavar="PATH", type=Path, required=True,
                        help="the services file or folder to explain")
    parser.add_argument("--rules", choices=[b for b in RULE_BACKENDS if b != "auto"],
                        default="iptables", help="the rule backend to render (default iptables)")
    parser.add_argument("--chain-prefix", metavar="NAME", default="UPROXY", type=chain_prefix,
                        help="prefix of uproxy's chains (nft: the table name, lower-cased)")
    parser.add_argument("--bind-address", metavar="IP", default="0.0.0.0",
                        type=typed("--bind-address", ip),
                        help="the listeners' address, as uproxy --bind-address (default 0.0.0.0)")
    parser.add_argument("--proxy-port-range", metavar="RANGE", default=DEFAULT_PORTS,
                        type=typed("--proxy-port-range", parse_port_range),
                        help="proxy ports are given out in order from its start "
                             "(default 30000-32767)")
    parser.add_argument("--hostname-override", metavar="NAME", default="",
                        help="this node's name: traffic policy Local and topology hints")
    parser.add_argument("--compare", action="store_true",
                        help="also print what kube-proxy's iptables, IPVS and nftables modes "
                             "would program, and how the four modes differ")
    parser.set_defaults(run=run)
    return parser


def with_examples(ports: Sequence[DesiredPort]
                  ) -> tuple[list[DesiredPort], dict[ObjectName, str]]:
    """Give each service without a clusterIP an example one (the same for all
    its ports); returns the ports and the addresses given."""
    given: dict[ObjectName, str] = {}
    for port in sorted(ports, key=lambda p: p.name):
        if not port.frontend.cluster_ips and port.name.service not in given:
            given[port.name.service] = str(EXAMPLE_ADDRESSES[EXAMPLE_FIRST + len(given)])
    out = [port if port.name.service not in given else dataclasses.replace(
        port, frontend=dataclasses.replace(port.frontend,
                                           cluster_ips=(given[port.name.service],)))
        for port in ports]
    return out, given


def assign_portals(ports: Sequence[DesiredPort], bind_address: str,
                   port_range: PortRange) -> list[Portal]:
    portals = []
    for index, port in enumerate(sorted(ports, key=lambda p: p.name)):
        if index >= port_range.size:
            raise UsageError(f"--proxy-port-range {port_range}: too small for {len(ports)} ports")
        wants_v6 = any(":" in ip for ip in port.frontend.addresses)
        address = "::" if wants_v6 and bind_address == "0.0.0.0" else bind_address
        portals.append(Portal(port.frontend, address, port_range.first + index))
    return portals


def run(args: argparse.Namespace) -> int:
    from uproxy.explain import explain
    from uproxy.model import ObjectName
    from uproxy.planner import desired_state
    from uproxy.rules.select import make_rules
    from uproxy.sources.file import SourceFileError, load_objects

    try:
        loaded = load_objects(args.services)
    except SourceFileError as error:
        print(f"uproxy explain: error: {error}", file=sys.stderr)
        return 1
    node_name = args.hostname_override or None
    node = loaded.nodes.get(ObjectName("", node_name)) if node_name else None
    state = desired_state(loaded.services, loaded.slices, node_name=node_name,
                          zone=node.zone if node is not None else "")
    ports = sorted(state.ports.values(), key=lambda p: p.name)
    examples: dict[ObjectName, str] = {}
    if args.rules != "none" or args.compare:
        ports, examples = with_examples(ports)
    portals = assign_portals(ports, args.bind_address, args.proxy_port_range)
    rules = make_rules(args.rules, args.chain_prefix, laptop_mode=args.rules == "none",
                       render_only=True)
    sys.stdout.write(explain(ports, portals, rules, prefix=args.chain_prefix,
                             compare=args.compare, services=loaded.services,
                             examples=examples))
    return 0
