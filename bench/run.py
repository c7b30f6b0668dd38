"""uproxy benchmark: one workload, many systems, one run, ratios to a direct connection.

    make bench                      # full run (3 rounds, ~20 min)
    python bench/run.py --quick     # 1 round, short durations (< 3 min)
    python bench/run.py --scenarios S2,S3 --systems direct,uproxy,haproxy-1t

Rounds are interleaved: every round runs each scenario on every system before
the next round starts. Results go to bench/results/ (results.jsonl,
results.md, results.png). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scenarios as sc
from bench.procs import run
from bench.report import SPECS, Table
from bench.systems import NS_ADDR, VIP, Context, SkipSystem, System, all_systems

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("S1", "S2", "S3", "S4", "S5", "C1")
C1_SIZES = (1, 100, 1_000, 10_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [s.name for s in all_systems()]
    default = [s.name for s in all_systems() if not s.opt_in]
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"systems: {', '.join(names)}\nscenarios: {', '.join(GROUPS)} "
               f"(or exact names: {', '.join(SPECS)})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per system (default 3; 1 with --quick)")
    parser.add_argument("--scenarios", default=",".join(GROUPS),
                        help="comma-separated scenario groups or names (default: all)")
    parser.add_argument("--systems", default=",".join(default),
                        help="comma-separated systems (default: all but the opt-in "
                             "uproxy-splice, uproxy-protocol, uproxy-sockmap)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 2 s runs, S5 at 2,000 connections only")
    parser.add_argument("--uproxy", default=None,
                        help="the uproxy command (default: `uproxy` next to this Python)")
    parser.add_argument("--uproxy-args", default="",
                        help="extra flags for every uproxy run, e.g. '--min-sync-period 0s'")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--max-minutes", type=float, default=40.0,
                        help="stop starting new measurements after this long (default 40)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite results.md/results.png from OUT/results.jsonl")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the work folder with every process's log")
    parser.add_argument("--lo-rps-cpus", default=None, metavar="MASK",
                        help="for this run, steer loopback receive processing to these "
                             "cpus (hex mask for /sys/class/net/lo/queues/rx-*/rps_cpus, "
                             "e.g. 1 = the proxies' cpu 0); restored after")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds: must be at least 1")
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    args.system_list = chosen
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in wanted if s not in GROUPS and s not in SPECS]
    if bad:
        parser.error(f"--scenarios: unknown {', '.join(bad)} "
                     f"(known: {', '.join(GROUPS)}, {', '.join(SPECS)})")
    args.scenario_list = [name for name in SPECS
                          if name in wanted or name.split("-")[0] in wanted]
    return args


def uproxy_command(args: argparse.Namespace) -> tuple[list[str], str, str]:
    """The uproxy argv, its --help text ("" if it does not run), and why not."""
    if args.uproxy:
        argv = args.uproxy.split()
    else:
        beside = Path(sys.executable).parent / "uproxy"
        found = str(beside) if beside.exists() else shutil.which("uproxy")
        argv = [found] if found else [sys.executable, "-m", "uproxy"]
    argv += args.uproxy_args.split()
    try:
        result = run([argv[0], "--help"] if not args.uproxy else [*argv, "--help"], timeout=20)
    except (OSError, TimeoutError) as exc:
        return argv, "", str(exc)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()
        return argv, "", last[-1] if last else f"exit {result.returncode}"
    return argv, result.stdout + result.stderr, ""


def make_netns() -> str | None:
    """A namespace for REDIRECT mode, with a route for the VIP (locally sent
    traffic needs one before nat OUTPUT sees it)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return None
    name = f"ubench-{uuid.uuid4().hex[:6]}"
    steps = [["ip", "netns", "add", name],
             ["ip", "-n", name, "link", "set", "lo", "up"],
             ["ip", "-n", name, "addr", "add", f"{NS_ADDR}/24", "dev", "lo"],
             ["ip", "-n", name, "route", "add", f"{VIP.rsplit('.', 1)[0]}.0/24", "dev", "lo",
              "src", NS_ADDR]]
    for step in steps:
        result = run(step, timeout=10)
        if result.returncode != 0:
            print(f"bench: netns setup failed ({' '.join(step)}): {result.stderr.strip()}")
            run(["ip", "netns", "del", name], timeout=10)
            return None
    return name


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} cpus ({model}), {mem:.0f} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def software() -> str:
    versions = []
    for argv in (["haproxy", "-v"], ["nginx", "-v"], ["socat", "-V"], ["iperf3", "-v"],
                 ["wrk", "-v"]):
        if not shutil.which(argv[0]):
            continue
        try:
            out = run(argv, timeout=10)
        except TimeoutError:
            continue
        text = (out.stdout + out.stderr).strip()
        line = next((ln for ln in text.splitlines() if "version" in ln.lower() or ln), "")
        versions.append(line.strip()[:60])
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions.append(f"uvloop {importlib.metadata.version('uvloop')}")
    return "; ".join(versions)


LOCK = Path("/tmp/uproxy-bench.lock")


def one_run_at_a_time(wait_minutes: float) -> int:
    """Hold a machine-wide lock: two runs would share ports and each other's CPUs."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_minutes * 60
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                sys.exit(f"bench: another run holds {LOCK} (pid {os.pread(fd, 20, 0).decode()});"
                         f" gave up after {wait_minutes:.0f} min")
            if not told:
                print(f"bench: waiting for another run to finish (pid "
                      f"{os.pread(fd, 20, 0).decode().strip()}, {LOCK})", flush=True)
                told = True
            time.sleep(1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind, stopping every process this run started


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def result(self, rnd: int, scenario: str, system: str, metrics: dict[str, float] | None,
               note: str = "") -> None:
        self.add({"kind": "result", "round": rnd, "scenario": scenario, "system": system,
                  "ok": metrics is not None, "metrics": metrics or {}, "note": note,
                  "ts": time.time()})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())
        print(f"[round {rnd}] {scenario:9} {system:16} {shown or note}", flush=True)


BACKEND_OF = {"S1": "iperf", "S2": "http", "S3": "http", "S4": "udp", "S5": "hold"}


def run_case(ctx: Context, system: System, group: str, names: list[str], rnd: int,
             durations: sc.Durations, rec: Recorder) -> None:
    """One system through one scenario group (S1 runs both stream counts on one start)."""
    backend, route = sc.start_backend(ctx, system, BACKEND_OF[group])
    try:
        running = system.start(ctx, route)
        try:
            for name in names:
                try:
                    if group == "S1":
                        metrics = sc.measure_bulk(ctx, system, running, durations,
                                                  int(name.split("-")[1]))
                    elif group in ("S2", "S3"):
                        metrics = sc.measure_http(ctx, system, running, durations,
                                                  close=group == "S2")
                    elif group == "S4":
                        metrics = sc.measure_udp(ctx, system, running, durations)
                    else:
                        sizes = tuple(s for s in durations.s5_sizes
                                      if f"S5-{s // 1000}k" in names)
                        for size, m in sc.measure_idle(ctx, system, running, sizes).items():
                            rec.result(rnd, f"S5-{size // 1000}k", system.name, m)
                        return
                    rec.result(rnd, name, system.name, metrics)
                except (RuntimeError, TimeoutError, ValueError, OSError) as exc:
                    rec.result(rnd, name, system.name, None, f"error: {exc}"[:300])
        finally:
            running.stop()
    finally:
        backend.stop()


def write_report(out: Path, records: list[dict[str, Any]]) -> Table:
    table = Table(records)
    (out / "results.md").write_text(table.markdown())
    problem = table.chart(out / "results.png")
    print(f"bench: wrote {out}/results.md" + (f" ({problem})" if problem
                                                else f", {out}/results.png"))
    return table


def steer_loopback(mask: str) -> dict[Path, str]:
    """Set RPS on every loopback receive queue: where the kernel does receive
    work (and the psock work sockmap redirects queue) on loopback. Returns the
    previous masks to restore."""
    previous: dict[Path, str] = {}
    for path in sorted(Path("/sys/class/net/lo/queues").glob("rx-*/rps_cpus")):
        previous[path] = path.read_text().strip()
        path.write_text(mask)
    if not previous:
        raise SystemExit("bench: --lo-rps-cpus: no /sys/class/net/lo/queues/rx-*/rps_cpus")
    return previous


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        lines = (args.out / "results.jsonl").read_text().splitlines()
        print(write_report(args.out, [json.loads(line) for line in lines if line]).printed())
        return 0
    signal.signal(signal.SIGTERM, interrupt)
    lock = one_run_at_a_time(args.max_minutes)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every process
    durations = sc.Durations.quick() if args.quick else sc.Durations.full()
    systems = [s for s in all_systems() if s.name in args.system_list]
    uproxy_argv, uproxy_help, uproxy_error = uproxy_command(args)
    workdir = Path(tempfile.mkdtemp(prefix="uproxy-bench-"))
    netns = make_netns() if any(s.in_netns for s in systems) else None
    ctx = Context(workdir, netns, uproxy_argv, uproxy_help, uproxy_error)
    rec = Recorder(args.out / "results.jsonl")
    rps_restore = steer_loopback(args.lo_rps_cpus) if args.lo_rps_cpus is not None else {}
    started = time.monotonic()
    port_base = sc.choose_ports()
    rec.add({"kind": "run", "date": datetime.datetime.now().astimezone().isoformat("T", "seconds"),
             "machine": machine(), "software": software(), "rounds": args.rounds,
             "quick": args.quick, "nofile": hard,
             "uproxy": " ".join(uproxy_argv),
             "pinning": {s.name: s.pinning for s in systems},
             "load": f"S1 iperf3 {durations.bulk}s (+1s omitted); S2/S3 wrk -t1 "
                     f"-c{sc.WRK_CONNECTIONS} {durations.requests}s; S4 "
                     f"{sc.UDP_PROCESSES}×{sc.UDP_CLIENTS_PER_PROCESS} closed-loop UDP clients "
                     f"{durations.requests}s; S5 sizes {durations.s5_sizes}, RLIMIT_NOFILE {hard}"
                     f"; C1 sizes {C1_SIZES}",
             "ports": {kind: [r.backend_port, r.front_port] for kind, r in sc.ROUTES.items()},
             "lo_rps_cpus": args.lo_rps_cpus})
    groups = list(dict.fromkeys(name.split("-")[0] for name in args.scenario_list))
    print(f"bench: {len(systems)} systems, scenarios {', '.join(args.scenario_list)}, "
          f"{args.rounds} round(s); ports {port_base}+; logs in {workdir}", flush=True)
    unavailable = {s.name: s.unavailable(ctx) for s in systems}
    try:
        for rnd in range(1, args.rounds + 1):
            for group in groups:
                names = [n for n in args.scenario_list if n.split("-")[0] == group]
                if group == "S5":
                    names = [n for n in names
                             if any(n == f"S5-{s // 1000}k" for s in durations.s5_sizes)]
                for system in systems:
                    if time.monotonic() - started > args.max_minutes * 60:
                        for name in names:
                            rec.result(rnd, name, system.name, None, "skip: --max-minutes reached")
                        continue
                    na = system.not_applicable(group)
                    reason = f"n/a: {na}" if na else (
                        f"skip: {unavailable[system.name]}" if unavailable[system.name] else "")
                    if reason:
                        if rnd == 1:
                            for name in names:
                                rec.result(rnd, name, system.name, None, reason)
                        continue
                    if group == "C1":
                        def record(name: str, metrics: dict[str, float],
                                   system: System = system, rnd: int = rnd) -> None:
                            rec.result(rnd, name, system.name, metrics)
                        try:
                            sc.measure_control_plane(ctx, system, C1_SIZES, record)
                        except (RuntimeError, TimeoutError, OSError) as exc:
                            rec.result(rnd, "C1-1", system.name, None, f"error: {exc}"[:300])
                        continue
                    try:
                        run_case(ctx, system, group, names, rnd, durations, rec)
                    except SkipSystem as exc:
                        unavailable[system.name] = str(exc)
                        for name in names:
                            rec.result(rnd, name, system.name, None, f"skip: {exc}"[:300])
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        for name in names:
                            rec.result(rnd, name, system.name, None, f"error: {exc}"[:300])
    except KeyboardInterrupt:
        print("bench: interrupted; reporting what was measured", flush=True)
    finally:
        for path, mask in rps_restore.items():
            path.write_text(mask)
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False, timeout=10)
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    table = write_report(args.out, rec.records)
    print("\nmedian primary metric (ratio to direct):")
    print(table.printed())
    print(f"\nbench: {time.monotonic() - started:.0f}s; results in {args.out}/results.jsonl")
    os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
