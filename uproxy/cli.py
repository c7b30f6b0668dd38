"""The command line: one parser, with the subcommands on argparse subparsers.

    uproxy [flags]                 run the proxy
    uproxy --cleanup [--rules B]   remove every rule uproxy made, exit 0
    uproxy explain --services F    print the plan and rules, touch nothing
    uproxy demo                    start loopback backends and proxy them

Errors in flags are one line naming the flag, and exit code 2. The flags,
their values and Settings are in `uproxy.commands.arguments`; each
subcommand is a module of `uproxy.commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uproxy import __version__
from uproxy.commands import demo, explain
from uproxy.commands.arguments import (
    DURATIONS_AND_RANGES,
    Parser,
    UsageError,
    add_run_arguments,
    attach_negative_values,
    settings_from_args,
)
from uproxy.settings import Settings

__all__ = ["UsageError", "build_parser", "main", "parse_settings"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="uproxy",
        description=(
            "A userspace TCP/UDP service proxy for Kubernetes-style services.\n"
            "Every service port gets a listener; kernel rules (or, in laptop mode,\n"
            "an IP per service) bring clients to it; connections are balanced\n"
            "round-robin over the endpoints."
        ),
        epilog=DURATIONS_AND_RANGES + "\n`uproxy COMMAND --help` describes a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"uproxy {__version__}")
    add_run_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser,
                                     title="commands")
    explain.add_parser(commands)
    demo.add_parser(commands)
    return parser


def parse_settings(argv: Sequence[str]) -> tuple[Settings, bool]:
    """(settings, cleanup) of the run command from the command line; raises UsageError."""
    parser = build_parser()
    args = parser.parse_args(attach_negative_values(parser, argv))
    return settings_from_args(args), bool(args.cleanup)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = arguments[0] if arguments[:1] in (["explain"], ["demo"]) else None
    prog = f"uproxy {command}" if command else "uproxy"
    try:
        parser = build_parser()
        args = parser.parse_args(attach_negative_values(parser, arguments))
        if args.command is not None:
            code: int = args.run(args)
            return code
        settings = settings_from_args(args)
    except UsageError as error:
        print(f"{prog}: error: {error} (see {prog} --help)", file=sys.stderr)
        return 2

    from uproxy import app
    from uproxy.eventloop import install_uvloop

    if args.cleanup:
        return app.cleanup(settings)
    install_uvloop()
    return app.main(settings)


if __name__ == "__main__":
    sys.exit(main())
