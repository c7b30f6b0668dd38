"""The command line: flags -> frozen Settings, and the subcommands.

    uproxy [flags]                 run the proxy
    uproxy --cleanup [--rules B]   remove every rule uproxy made, exit 0
    uproxy explain --services F    print the plan and rules, touch nothing
    uproxy demo                    start loopback backends and proxy them

Errors in flags are one line naming the flag, and exit code 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from uproxy import __version__
from uproxy.durations import PortRange, parse_duration, parse_host_port, parse_port_range
from uproxy.rules.render import check_chain_prefix
from uproxy.settings import (
    ListenerSettings,
    LogSettings,
    RulesSettings,
    Settings,
    SourceSettings,
    SyncSettings,
    WebSettings,
)

RULE_BACKENDS = ("auto", "iptables", "nft", "iptc", "none")
T = TypeVar("T")


class UsageError(Exception):
    """A bad flag or flag combination; the message is the one line users see."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _typed(flag: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise UsageError(f"{flag}: {error}") from None

    return convert


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise ValueError(f"{text!r} is not a CIDR range ({error})") from None


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _bind_or_empty(text: str) -> str:
    if text.strip():
        parse_host_port(text)
    return text.strip()


def _chain_prefix(text: str) -> str:
    try:
        return check_chain_prefix(text)
    except ValueError as error:  # its message names the flag already
        raise UsageError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="uproxy",
        description=(
            "A userspace TCP/UDP service proxy for Kubernetes-style services.\n"
            "Every service port gets a listener; kernel rules (or, in laptop mode,\n"
            "an IP per service) bring clients to it; connections are balanced\n"
            "round-robin over the endpoints."
        ),
        epilog=(
            "subcommands:\n"
            "  uproxy explain --services F [--rules B] [--compare]  print rules, packet paths\n"
            "  uproxy demo                                           proxy loopback backends\n"
            "durations: 250ms, 30s, 5m, 3h.  port ranges: N, A-B, A+K."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"uproxy {__version__}")

    source = parser.add_argument_group("source (the services file, else Kubernetes)")
    source.add_argument("--services", metavar="PATH", type=Path,
                        help="services file or folder (YAML/JSON; short form or "
                             "Service+EndpointSlice objects); reloaded on change and SIGHUP")
    source.add_argument("--kubeconfig", metavar="PATH",
                        help="kubeconfig for the Kubernetes source (default: $KUBECONFIG, "
                             "~/.kube/config, or in-cluster)")
    source.add_argument("--master", metavar="URL", help="Kubernetes API server URL")
    source.add_argument("--namespace", metavar="NS", action="append", default=[],
                        help="watch only this namespace (repeatable; default: all)")
    source.add_argument("--hostname-override", metavar="NAME",
                        help="this node's name, for traffic policy Local (default: hostname)")
    source.add_argument("--hosts-file", metavar="PATH", type=Path,
                        help="laptop mode: write a hosts-file fragment naming each service")

    listen = parser.add_argument_group("listeners")
    listen.add_argument("--bind-range", metavar="CIDR", type=_typed("--bind-range", _network),
                        help="laptop mode: give every service its own IP from CIDR and listen "
                             "on IP:port (127.0.0.0/8 needs no root); no kernel rules")
    listen.add_argument("--bind-address", metavar="IP", type=_typed("--bind-address", _ip),
                        default="0.0.0.0", help="address listeners bind in rules mode "
                                                "(default 0.0.0.0)")
    listen.add_argument("--proxy-port-range", metavar="RANGE",
                        type=_typed("--proxy-port-range", parse_port_range),
                        help="proxy ports for listeners: N, A-B or A+K (default: the OS picks)")
    listen.add_argument("--udp-timeout", metavar="DURATION",
                        type=_typed("--udp-timeout", parse_duration), default=30.0,
                        help="idle time before a UDP session ends (default 30s)")
    listen.add_argument("--relay", dest="relay_mode", choices=("auto", "splice", "protocol"),
                        default="auto", help="TCP data path (default auto)")
    listen.add_argument("--workers", metavar="N", type=_typed("--workers", _positive_int),
                        default=1, help="processes sharing each listener (default 1)")

    rules = parser.add_argument_group("kernel rules")
    rules.add_argument("--rules", choices=RULE_BACKENDS, default="auto",
                       help="rule backend; auto: none with --bind-range, else iptables")
    rules.add_argument("--chain-prefix", metavar="NAME", default="UPROXY",
                       type=_chain_prefix,
                       help="prefix of uproxy's chains (nft: the table name, lower-cased)")
    rules.add_argument("--cleanup", action="store_true",
                       help="remove every chain and jump uproxy made, then exit")

    sync = parser.add_argument_group("sync")
    sync.add_argument("--sync-period", "--iptables-sync-period", metavar="DURATION",
                      dest="sync_period", type=_typed("--sync-period", parse_duration),
                      default=30.0, help="full sync at least this often (default 30s)")
    sync.add_argument("--min-sync-period", "--iptables-min-sync-period", metavar="DURATION",
                      dest="min_sync_period", type=_typed("--min-sync-period", parse_duration),
                      default=1.0, help="sync at most this often (default 1s)")

    web = parser.add_argument_group("observability")
    web.add_argument("--healthz-bind-address", metavar="HOST:PORT", default="0.0.0.0:10256",
                     type=_typed("--healthz-bind-address", _bind_or_empty),
                     help="/healthz and /readyz (default 0.0.0.0:10256; port 0 picks one; "
                          "'' disables)")
    web.add_argument("--metrics-bind-address", metavar="HOST:PORT", default="127.0.0.1:10249",
                     type=_typed("--metrics-bind-address", _bind_or_empty),
                     help="/metrics, /status, /status.json (default 127.0.0.1:10249)")
    web.add_argument("--log-format", choices=("text", "json"), default="text")
    web.add_argument("-v", "--verbose", action="count", default=0,
                     help="-v: access log line per connection")

    life = parser.add_argument_group("lifecycle")
    life.add_argument("--shutdown-grace", metavar="DURATION", default=10.0,
                      type=_typed("--shutdown-grace", parse_duration),
                      help="how long open connections may drain on SIGTERM (default 10s)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.services is not None and (args.kubeconfig or args.master):
        raise UsageError("--services: cannot be combined with --kubeconfig or --master")
    if args.min_sync_period > args.sync_period:
        raise UsageError("--min-sync-period: must not be longer than --sync-period")
    if args.bind_range is not None and args.rules not in ("auto", "none"):
        raise UsageError(f"--rules {args.rules}: laptop mode (--bind-range) installs no rules")
    if args.bind_range is not None and args.bind_range.num_addresses < 1:
        raise UsageError("--bind-range: the range is empty")
    port_range: PortRange | None = args.proxy_port_range
    return Settings(
        source=SourceSettings(
            services_path=args.services,
            kubeconfig=args.kubeconfig,
            master=args.master,
            namespaces=tuple(args.namespace),
            node_name=(args.hostname_override or socket.gethostname()).strip().lower(),
            hosts_file=args.hosts_file,
        ),
        listeners=ListenerSettings(
            bind_address=args.bind_address,
            proxy_port_range=port_range,
            bind_range=args.bind_range,
            udp_timeout=args.udp_timeout,
            relay_mode=args.relay_mode,
            workers=args.workers,
        ),
        rules=RulesSettings(backend=args.rules, chain_prefix=args.chain_prefix),
        sync=SyncSettings(sync_period=args.sync_period, min_sync_period=args.min_sync_period),
        web=WebSettings(
            healthz_bind=args.healthz_bind_address, metrics_bind=args.metrics_bind_address
        ),
        logs=LogSettings(format=args.log_format, verbose=args.verbose),
        shutdown_grace=args.shutdown_grace,
    )


def parse_settings(argv: Sequence[str]) -> tuple[Settings, bool]:
    """(settings, cleanup) from the command line; raises UsageError."""
    args = build_parser().parse_args(list(argv))
    return settings_from_args(args), bool(args.cleanup)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        if arguments[:1] == ["explain"]:
            from uproxy.explain_cmd import explain_main

            return explain_main(arguments[1:])
        if arguments[:1] == ["demo"]:
            from uproxy.demo import demo_main

            return demo_main(arguments[1:])
        settings, cleanup = parse_settings(arguments)
    except UsageError as error:
        print(f"uproxy: error: {error} (see uproxy --help)", file=sys.stderr)
        return 2

    from uproxy import app

    if cleanup:
        return app.cleanup(settings)
    if os.environ.get("UPROXY_NO_UVLOOP") != "1":
        import uvloop

        uvloop.install()
    return app.main(settings)


if __name__ == "__main__":
    sys.exit(main())
