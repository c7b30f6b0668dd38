"""How long rule syncs take, per backend, in a throwaway network namespace.

    sudo python bench/rules_bench.py [--sizes 100,1000,10000] [--backends iptables,nft]

For N services with 2 ports each, as the proxier calls the backend:
- full sync: a fresh backend instance (a new process), empty kernel, verify=True;
- 1-svc change: remove one service, then add it back (verify=False and the
  delta, as the proxier passes a sync that carries changes; the mean of both);
- verify pass: the periodic pass with nothing changed (verify=True: read the
  kernel, compare, send nothing);
- restart: a fresh instance over the rules a killed process left (verify=True).
Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from uproxy.model import Frontend, ServicePortName
from uproxy.rules.base import Portal, PortalDelta
from uproxy.rules.iptables import IptablesRules
from uproxy.rules.nft import NftRules


def portals(services: int) -> list[Portal]:
    out = []
    for i in range(services):
        ip = f"198.18.{i // 250}.{i % 250 + 1}"
        for j, (name, port) in enumerate((("http", 80), ("https", 443))):
            frontend = Frontend(ServicePortName("bench", f"svc{i}", name, "TCP"), port, "TCP",
                                cluster_ips=(ip,))
            out.append(Portal(frontend, "0.0.0.0", 20000 + (2 * i + j) % 40000))
    return out


def make(kind: str) -> Any:
    if kind == "iptables":
        return IptablesRules("UBENCH")
    if kind == "iptables-legacy":
        return IptablesRules("UBENCH", legacy=True)
    if kind == "nft":
        return NftRules("UBENCH")
    if kind == "iptc":
        from uproxy.rules.iptc import IptcRules

        return IptcRules("UBENCH", iptables_cmd="iptables-legacy")
    raise SystemExit(f"--backends: unknown backend {kind!r}")


async def measure(kind: str, services: int) -> tuple[float, float, float, float]:
    every = portals(services)
    fewer = every[2:]  # service 0 (both ports) removed
    rules = make(kind)
    started = time.perf_counter()
    await rules.apply(every, verify=True)
    full = time.perf_counter() - started
    changes = []
    gone, back = PortalDelta(gone=tuple(every[:2])), PortalDelta(new=tuple(every[:2]))
    for target, delta in ((fewer, gone), (every, back)):
        started = time.perf_counter()
        await rules.apply(target, verify=False, delta=delta)  # as the proxier calls it
        changes.append(time.perf_counter() - started)
    started = time.perf_counter()
    await rules.apply(every, verify=True)
    same = time.perf_counter() - started
    started = time.perf_counter()
    await make(kind).apply(every, verify=True)
    restart = time.perf_counter() - started
    await rules.cleanup()
    return full, sum(changes) / len(changes), same, restart


def inside(args: argparse.Namespace) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(f"{'backend':<16}{'services':>9}{'entries':>8}{'full sync':>12}"
          f"{'1-svc change':>14}{'verify pass':>13}{'restart':>12}")
    for kind in args.backends.split(","):
        for services in (int(s) for s in args.sizes.split(",")):
            if kind == "iptc" and services > 1000:
                continue  # libiptc per-rule appends: minutes at 10k, not a target
            full, change, same, restart = asyncio.run(measure(kind, services))
            print(f"{kind:<16}{services:>9}{services * 2:>8}{full * 1000:>10.1f}ms"
                  f"{change * 1000:>12.1f}ms{same * 1000:>11.1f}ms{restart * 1000:>10.1f}ms",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--backends", default="iptables,iptables-legacy,nft,iptc")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("rules_bench: needs root (it makes a network namespace)")
    name = f"uproxy-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "--inside",
                        "--sizes", args.sizes, "--backends", args.backends], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    main()
