"""`uproxy demo`: a cluster-in-a-box on loopback (the README's first command).

Starts the demo backends (`uproxy.demo`), writes a services file for them
from the bundled example, and runs uproxy on it in laptop mode; after the
first sync it prints, from the running proxy's own state, what to try.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from uproxy.commands.arguments import UsageError, add_run_arguments, network, settings_from_args
from uproxy.eventloop import install_uvloop

DESCRIPTION = ("Start small backends on 127.0.0.1 (two HTTP pods, a TCP echo, a UDP echo), "
               "and proxy them in laptop mode: every service gets its own loopback IP. "
               "Prints the table and what to try; Ctrl-C stops it all.")
DEMO_RANGE = "127.77.0.0/16"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The `demo` subcommand: the run flags but the source and the rules."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo", help="proxy loopback backends in laptop mode", description=DESCRIPTION)
    add_run_arguments(parser, ("listeners", "sync", "observability", "lifecycle"))
    parser.set_defaults(
        run=run, bind_range=network(DEMO_RANGE),
        # What the demo does not take as flags: its own services file, no rules.
        services=None, kubeconfig=None, master=None, context=None, namespace=[],
        hostname_override=None, dial="direct",
        hosts_file=None, service_proxy_name=None, rules="auto", chain_prefix="UPROXY",
        cleanup=False,
    )
    return parser


def hints(bound: dict[tuple[str, str], tuple[str, int]], metrics_url: str | None) -> str:
    """What to try, from the running proxy: (service, protocol) -> (IP, port)."""
    lines = ["", "try:"]
    for (service, protocol), (host, port) in sorted(bound.items()):
        address = f"{host}:{port}"
        if service.endswith("/web"):
            lines.append(f"  curl http://{address}/            # {service}: "
                         "round-robin over 2 pods")
        elif protocol == "UDP":
            lines.append(f"  echo hi | nc -u -w1 {host} {port}     # {service}: UDP echo")
        else:
            lines.append(f"  echo hi | nc -q1 {host} {port}        # {service}: TCP echo")
    if metrics_url is not None:
        lines.append(f"  open {metrics_url}/status      # the live status page")
    lines.append("Ctrl-C stops the demo.\n")
    return "\n".join(lines)


async def _demo(args: argparse.Namespace) -> int:
    from uproxy import app
    from uproxy.demo import start_backends, write_services_file

    endpoints, closers = await start_backends()
    with tempfile.TemporaryDirectory(prefix="uproxy-demo-") as folder:
        args.services = write_services_file(Path(folder), endpoints)
        settings = settings_from_args(args)
        parts: app.Parts | None = None

        def show(table: str) -> None:
            app.print_table(table)
            if parts is not None and parts.runner.syncs == 0:  # the first table only
                bound = {(str(name.service), name.protocol): address
                         for name, address in parts.proxier.bound.items()}
                metrics = [s.url for s in parts.web_servers if s.kind == "metrics"]
                print(hints(bound, metrics[0] if metrics else None), flush=True)

        print(f"uproxy demo: backends on 127.0.0.1, services file {args.services}", flush=True)
        parts = app.build(settings, table_writer=show)
        try:
            await app.run(parts)
        finally:
            for closer in closers:
                closer.close()
    return 0


def run(args: argparse.Namespace) -> int:
    from uproxy import app
    from uproxy.logs import setup_logging

    setup_logging("json" if args.log_format == "json" else "text", args.verbose)
    install_uvloop()
    try:
        return asyncio.run(_demo(args))
    except UsageError as error:
        print(f"uproxy demo: error: {error}", file=sys.stderr)
        return 2
    except app.StartupError as error:
        print(f"uproxy demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("stopped", file=sys.stderr)
        return 0
