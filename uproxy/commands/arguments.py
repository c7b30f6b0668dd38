"""What the subcommands share: a parser whose errors are one line naming the
flag, typed flag values, and the flags that configure a running uproxy.

Errors in flags are UsageError (exit code 2); settings are built once, here,
into the frozen `Settings`, and nothing below the command line reads flags.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from uproxy.dialing import MODES as DIAL_MODES
from uproxy.durations import PortRange, parse_duration, parse_host_port, parse_port_range
from uproxy.relay.tcp import MODES as RELAY_MODES
from uproxy.rules.render import check_chain_prefix
from uproxy.rules.select import KINDS
from uproxy.settings import (
    BindAddress,
    ListenerSettings,
    LogSettings,
    RulesSettings,
    Settings,
    SourceSettings,
    SyncSettings,
    WebSettings,
)

RULE_BACKENDS = KINDS  # --rules choices: the backends' own list
T = TypeVar("T")
UNSET = object()  # a flag left at its default, which may depend on other flags
DURATIONS_AND_RANGES = "durations: 250ms, 30s, 5m, 3h.  port ranges: N, A-B, A+K."


class UsageError(Exception):
    """A bad flag or flag combination; the message is the one line users see."""


class Parser(argparse.ArgumentParser):
    """Errors are UsageError; flags are spelled out (no `--vers` for
    `--version`, as kube-proxy's flags are not abbreviated either)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def typed(flag: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    """A flag's type: the parser's ValueError becomes `FLAG: reason`."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise UsageError(f"{flag}: {error}") from None

    return convert


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise ValueError(f"{text!r} is not a CIDR range ({error})") from None


def ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def bind_or_empty(text: str) -> BindAddress | None:
    """IP:PORT, ':PORT' (every IPv4 address), 'localhost:PORT'; '' disables."""
    return parse_host_port(text) if text.strip() else None


_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def label_value(text: str) -> str:
    """A Kubernetes label value (63 characters, alphanumeric at both ends)."""
    if not _LABEL_VALUE.match(text):
        raise ValueError(f"{text!r} is not a label value (up to 63 of A-Z a-z 0-9 - _ ., "
                         "starting and ending alphanumeric)")
    return text


def chain_prefix(text: str) -> str:
    try:
        return check_chain_prefix(text)
    except ValueError as error:  # its message names the flag already
        raise UsageError(str(error)) from None


_LOOKS_NEGATIVE = re.compile(r"^-[0-9.]")


def attach_negative_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`--flag -1s` as `--flag=-1s`, so the value's own check explains what is
    wrong with it; argparse would take -1s for an option and say only
    'expected one argument'."""
    out: list[str] = []
    for token in argv:
        action = parser._option_string_actions.get(out[-1]) if out else None
        if (action is not None and action.nargs is None and action.option_strings
                and _LOOKS_NEGATIVE.match(token)):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


# The groups of run flags; the demo takes all but "source", "dialing" and "rules".
RUN_GROUPS = ("source", "listeners", "dialing", "rules", "sync", "observability", "lifecycle")


def add_run_arguments(parser: argparse.ArgumentParser,
                      groups: Collection[str] = RUN_GROUPS) -> None:
    """The flags that configure a running uproxy, in their help groups."""
    if "source" in groups:
        source = parser.add_argument_group("source (the services file, else Kubernetes)")
        source.add_argument("--services", metavar="PATH", type=Path,
                            help="services file or folder (YAML/JSON; short form or "
                                 "Service+EndpointSlice objects); reloaded on change and SIGHUP")
        source.add_argument("--kubeconfig", metavar="PATH",
                            help="kubeconfig for the Kubernetes source (default: $KUBECONFIG, "
                                 "~/.kube/config, or in-cluster)")
        source.add_argument("--master", metavar="URL", help="Kubernetes API server URL")
        source.add_argument("--context", metavar="NAME",
                            help="the kubeconfig context to use (default: its current context)")
        source.add_argument("--namespace", metavar="NS", action="append", default=[],
                            help="watch only this namespace (repeatable; default: all)")
        source.add_argument("--hostname-override", metavar="NAME",
                            help="this node's name: traffic policy Local, topology hints, "
                                 "and the Node whose zone they use (default: hostname)")
        source.add_argument("--hosts-file", metavar="PATH", type=Path,
                            help="laptop mode: write a hosts-file fragment naming each service")
        source.add_argument("--service-proxy-name", metavar="NAME",
                            type=typed("--service-proxy-name", label_value),
                            help="serve only services labelled service.kubernetes.io/"
                                 "service-proxy-name=NAME, the ones kube-proxy skips "
                                 "(default: only services without that label)")

    if "listeners" in groups:
        listen = parser.add_argument_group("listeners")
        listen.add_argument("--bind-range", metavar="CIDR", type=typed("--bind-range", network),
                            help="laptop mode: give every service its own IP from CIDR and "
                                 "listen on IP:port (127.0.0.0/8 needs no root); no kernel rules")
        listen.add_argument("--bind-address", metavar="IP", type=typed("--bind-address", ip),
                            default="0.0.0.0",
                            help="address listeners bind in rules mode (default 0.0.0.0)")
        listen.add_argument("--proxy-port-range", metavar="RANGE",
                            type=typed("--proxy-port-range", parse_port_range),
                            help="proxy ports for listeners: N, A-B or A+K "
                                 "(default: the OS picks)")
        listen.add_argument("--udp-timeout", metavar="DURATION",
                            type=typed("--udp-timeout", parse_duration), default=30.0,
                            help="idle time before a UDP session ends (default 30s)")
        listen.add_argument("--relay", dest="relay_mode", choices=("auto", *sorted(
                            m for m in RELAY_MODES if m != "auto")),
                            default="auto", help="TCP data path (default auto)")
        listen.add_argument("--workers", metavar="N", type=typed("--workers", positive_int),
                            default=1, help="processes sharing each listener (default 1)")

    if "dialing" in groups:
        dialing = parser.add_argument_group("dialing")
        dialing.add_argument("--dial", choices=DIAL_MODES, default=None,
                             help="how endpoints are reached: direct, through the API server's "
                                  "port-forward, or auto (per pod network: direct when it "
                                  "answers from here). Default: auto in laptop mode with the "
                                  "Kubernetes source, else direct")

    if "rules" in groups:
        rules = parser.add_argument_group("kernel rules")
        rules.add_argument("--rules", choices=RULE_BACKENDS, default="auto",
                           help="rule backend; auto: none with --bind-range, else iptables")
        rules.add_argument("--chain-prefix", metavar="NAME", default="UPROXY",
                           type=chain_prefix,
                           help="prefix of uproxy's chains (nft: the table name, lower-cased)")
        rules.add_argument("--cleanup", action="store_true",
                           help="remove every chain and jump uproxy made, then exit")

    if "sync" in groups:
        sync = parser.add_argument_group("sync")
        sync.add_argument("--sync-period", "--iptables-sync-period", metavar="DURATION",
                          dest="sync_period", type=typed("--sync-period", parse_duration),
                          default=30.0, help="full sync at least this often (default 30s)")
        sync.add_argument("--min-sync-period", "--iptables-min-sync-period", metavar="DURATION",
                          dest="min_sync_period",
                          type=typed("--min-sync-period", parse_duration),
                          default=1.0, help="sync at most this often (default 1s)")

    if "observability" in groups:
        web = parser.add_argument_group("observability")
        web.add_argument("--healthz-bind-address", metavar="HOST:PORT", default=UNSET,
                         type=typed("--healthz-bind-address", bind_or_empty),
                         help="/healthz and /readyz (default 0.0.0.0:10256; laptop mode "
                              "127.0.0.1:10256; port 0 picks one; '' disables)")
        web.add_argument("--metrics-bind-address", metavar="HOST:PORT", default=UNSET,
                         type=typed("--metrics-bind-address", bind_or_empty),
                         help="/metrics, /status, /status.json (default 127.0.0.1:10249)")
        web.add_argument("--log-format", choices=("text", "json"), default="text")
        web.add_argument("-v", "--verbose", action="count", default=0,
                         help="-v: access log line per connection")

    if "lifecycle" in groups:
        life = parser.add_argument_group("lifecycle")
        life.add_argument("--shutdown-grace", metavar="DURATION", default=10.0,
                          type=typed("--shutdown-grace", parse_duration),
                          help="how long open connections may drain on SIGTERM (default 10s)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the run flags; raises UsageError for a bad combination."""
    if args.services is not None and (args.kubeconfig or args.master):
        raise UsageError("--services: cannot be combined with --kubeconfig or --master")
    if args.min_sync_period > args.sync_period:
        raise UsageError("--min-sync-period: must not be longer than --sync-period")
    if args.bind_range is not None and args.rules not in ("auto", "none"):
        raise UsageError(f"--rules {args.rules}: laptop mode (--bind-range) installs no rules")
    if args.bind_range is not None and args.bind_range.num_addresses < 1:
        raise UsageError("--bind-range: the range is empty")
    port_range: PortRange | None = args.proxy_port_range
    laptop = args.bind_range is not None
    dial = _dial_mode(args, laptop)
    return Settings(
        source=SourceSettings(
            services_path=args.services,
            kubeconfig=args.kubeconfig,
            master=args.master,
            context=args.context,
            namespaces=tuple(args.namespace),
            node_name=node_name(args.hostname_override),
            hosts_file=args.hosts_file,
            service_proxy_name=args.service_proxy_name,
        ),
        listeners=ListenerSettings(
            bind_address=args.bind_address,
            proxy_port_range=port_range,
            bind_range=args.bind_range,
            udp_timeout=args.udp_timeout,
            relay_mode=args.relay_mode,
            workers=args.workers,
            dial=dial,
        ),
        rules=RulesSettings(backend=args.rules, chain_prefix=args.chain_prefix),
        sync=SyncSettings(sync_period=args.sync_period, min_sync_period=args.min_sync_period),
        web=WebSettings(
            # A laptop must not open its health port to its network.
            healthz_bind=_chosen(args.healthz_bind_address,
                                 ("127.0.0.1" if laptop else "0.0.0.0", 10256)),
            metrics_bind=_chosen(args.metrics_bind_address, ("127.0.0.1", 10249)),
        ),
        logs=LogSettings(format=args.log_format, verbose=args.verbose),
        shutdown_grace=args.shutdown_grace,
    )


def node_name(override: str | None = None) -> str:
    """This node's name for traffic policy Local: --hostname-override, else the
    hostname; lower-cased and stripped, as kube-proxy does."""
    return (override or socket.gethostname()).strip().lower()


def _dial_mode(args: argparse.Namespace, laptop: bool) -> str:
    """--dial, resolved: auto where port-forward can help (laptop mode, the
    Kubernetes source, one process), else direct; a combination that cannot
    work is one line."""
    kube = args.services is None
    if args.dial is None:
        return "auto" if laptop and kube and args.workers == 1 else "direct"
    if args.dial != "direct":
        flag = f"--dial {args.dial}"
        if not kube:
            raise UsageError(f"{flag}: needs the Kubernetes source (pods are reached through "
                             "its API server), not --services")
        if not laptop:
            raise UsageError(f"{flag}: only in laptop mode (--bind-range); a node reaches "
                             "its pods directly")
        if args.workers > 1:
            raise UsageError(f"{flag}: not with --workers {args.workers} (workers dial "
                             "directly); use --workers 1")
    return str(args.dial)


def _chosen(value: object, default: BindAddress) -> BindAddress | None:
    return default if value is UNSET else value  # type: ignore[return-value]
