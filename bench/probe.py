"""Readiness probe: exit 0 once HOST:PORT answers, 1 after the timeout.

    probe.py tcp|udp HOST PORT [--timeout S]

tcp: a connection is accepted (the listener, and any redirect rule, is in
place). udp: a datagram comes back (the whole path works; needs an echo
backend).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["tcp", "udp"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            if args.kind == "tcp":
                with socket.create_connection((args.host, args.port), timeout=0.3):
                    return 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.2)
                sock.connect((args.host, args.port))
                sock.send(b"probe")
                if sock.recv(64):
                    return 0
        except OSError:
            pass
        time.sleep(0.05)
    print(f"probe: {args.kind} {args.host}:{args.port} not ready after {args.timeout}s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
