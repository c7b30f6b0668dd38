"""The workloads: one backend and one load generator per scenario, the same for every system.

Load generators and backends run on CPU 1 (`taskset -c 1`), in the system's
network namespace when it has one. Each `measure_*` returns a flat dict of
numbers for one (round, scenario, system).
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import CpuMeter, Proc, rss_bytes, run, wait_until
from bench.systems import (
    BENCH_DIR,
    BIND_RANGE,
    LOAD_CPUS,
    PROXY_CPUS,
    Context,
    Route,
    Running,
    System,
    TableReader,
    start_nginx,
    wait_for_table,
)

READY = re.compile(r"READY (\d+)")
HTTP_BODY = "x" * 99 + "\n"  # 100 bytes
WRK_CONNECTIONS = 32
UDP_PROCESSES = 2
UDP_CLIENTS_PER_PROCESS = 32


@dataclass(frozen=True)
class Durations:
    bulk: float  # S1 seconds per iperf3 run (after a 1 s omitted warm-up)
    requests: float  # S2/S3/S4 seconds
    s5_sizes: tuple[int, ...]  # idle connection counts, cumulative in one proxy run

    @staticmethod
    def full() -> Durations:
        return Durations(bulk=4, requests=4, s5_sizes=(2_000, 10_000))

    @staticmethod
    def quick() -> Durations:
        return Durations(bulk=2, requests=2, s5_sizes=(2_000,))


# --- backends ---------------------------------------------------------------

PORT_OFFSETS = {"iperf": ("tcp", 201), "http": ("tcp", 80), "udp": ("udp", 353),
                "hold": ("tcp", 400)}
ROUTES: dict[str, Route] = {}


def choose_ports(bases: range = range(15_000, 20_000, 500)) -> int:
    """The first port base whose backend and front ports are all free here; sets ROUTES.

    Fixed ports collide with whatever else runs on a shared machine (a
    leftover backend, a test); every port is checked by binding it.
    """
    for base in bases:
        routes = {kind: Route(proto, base + offset)
                  for kind, (proto, offset) in PORT_OFFSETS.items()}
        if all(_free(r.proto, port) for r in routes.values()
               for port in (r.backend_port, r.front_port)):
            ROUTES.clear()
            ROUTES.update(routes)
            return base
    raise RuntimeError(f"no free port base in {bases}")


def _free(proto: str, port: int) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def refuse_busy(port: int) -> None:
    """A listener already on our port means another run or service: the numbers would lie."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            pass
    except OSError:
        return
    raise RuntimeError(f"127.0.0.1:{port} already has a listener before the harness started "
                       "one (another benchmark run?)")


def start_backend(ctx: Context, system: System, kind: str) -> tuple[Proc, Route]:
    prefix = system.prefix(ctx, LOAD_CPUS)
    if not ROUTES:
        choose_ports()
    route = ROUTES[kind]
    if not system.in_netns and route.proto == "tcp":
        refuse_busy(route.backend_port)
        if system.name != "direct" and not system.name.startswith("uproxy"):
            refuse_busy(route.front_port)
    if kind == "iperf":
        proc = Proc([*prefix, "iperf3", "-s", "-B", "127.0.0.1", "-p", str(route.backend_port)],
                    ctx.path("iperf3-server.log"), "iperf3")
    elif kind == "http":
        body = f"""http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{route.backend_port} backlog=4096;
        location / {{ return 200 "{HTTP_BODY.rstrip()}\\n"; }}
    }}
}}"""
        proc = start_nginx(ctx, "backend", 1, body, prefix)
    elif kind == "udp":
        proc = Proc([*prefix, sys.executable, str(BENCH_DIR / "udpload.py"), "echo", "127.0.0.1",
                     str(route.backend_port)], ctx.path("udp-echo.log"), "udp-echo")
    elif kind == "hold":
        proc = Proc([*prefix, sys.executable, str(BENCH_DIR / "holdconns.py"), "server",
                     "127.0.0.1", str(route.backend_port)], ctx.path("hold-server.log"), "hold")
    else:
        raise ValueError(kind)
    probe = run([*prefix, sys.executable, str(BENCH_DIR / "probe.py"), route.proto, "127.0.0.1",
                 str(route.backend_port), "--timeout", "10"], timeout=15)
    if probe.returncode != 0:
        tail = proc.tail()
        proc.stop()
        raise RuntimeError(f"backend {kind} did not start: {tail}")
    return proc, route


# --- load generators ----------------------------------------------------------

def measure_bulk(ctx: Context, system: System, running: Running, durations: Durations,
                 streams: int) -> dict[str, float]:
    host, port = running.front
    cpu = CpuMeter(running.pid)
    result = run([*system.prefix(ctx, LOAD_CPUS), "iperf3", "-c", host, "-p", str(port),
                  "-t", str(durations.bulk), "-O", "1", "-P", str(streams), "-J",
                  "--connect-timeout", "3000"], timeout=durations.bulk + 20)
    cpu_pct = cpu.percent()
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3: {result.stderr.strip() or result.stdout[-200:]}") from exc
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    metrics = {"gbps": report["end"]["sum_received"]["bits_per_second"] / 1e9}
    if cpu_pct is not None:
        metrics["proxy_cpu_pct"] = cpu_pct
    return metrics


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(text)
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise RuntimeError(f"wrk: no Requests/sec in output: {output[-300:]!r}")
    metrics["rps"] = float(rps[1])
    if metrics["rps"] == 0:
        raise RuntimeError(f"wrk completed no requests: {output.strip()[-200:]!r}")
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        if found:
            metrics[f"p{pct}_ms"] = _wrk_ms(found[1])
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    metrics["errors"] = float(sum(int(g) for g in errors.groups()) if errors else 0) + (
        float(non2xx[1]) if non2xx else 0.0)
    return metrics


def measure_http(ctx: Context, system: System, running: Running, durations: Durations,
                 close: bool) -> dict[str, float]:
    host, port = running.front
    argv = [*system.prefix(ctx, LOAD_CPUS), "wrk", "-t1", f"-c{WRK_CONNECTIONS}",
            f"-d{durations.requests}s", "--latency", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    cpu = CpuMeter(running.pid)
    result = run([*argv, f"http://{host}:{port}/"], timeout=durations.requests + 20)
    cpu_pct = cpu.percent()
    metrics = parse_wrk(result.stdout)
    if cpu_pct is not None:
        metrics["proxy_cpu_pct"] = cpu_pct
    return metrics


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_udp(ctx: Context, system: System, running: Running,
                durations: Durations) -> dict[str, float]:
    host, port = running.front
    argv = [*system.prefix(ctx, LOAD_CPUS), sys.executable, str(BENCH_DIR / "udpload.py"),
            "client", host, str(port), "--clients", str(UDP_CLIENTS_PER_PROCESS),
            "--duration", str(durations.requests)]
    cpu = CpuMeter(running.pid)
    clients = [Proc(argv, ctx.path(f"udp-client-{i}.log"), "udp-client")
               for i in range(UDP_PROCESSES)]
    try:
        wait_until(lambda: not any(c.alive() for c in clients), durations.requests + 20, 0.05)
    finally:
        for client in clients:
            client.stop(grace=1)
    cpu_pct = cpu.percent()
    replies, lost, samples = 0, 0, []
    for client in clients:
        lines = [line for line in client.log.read_text().splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"udp client produced no report: {client.tail()}")
        report = json.loads(lines[-1])
        replies += report["replies"]
        lost += report["lost"]
        samples += report["samples_ms"]
    if not samples:
        raise RuntimeError(f"no UDP replies ({lost} lost)")
    metrics = {"rps": replies / durations.requests, "p50_ms": percentile(samples, 0.50),
               "p99_ms": percentile(samples, 0.99), "lost": float(lost)}
    if cpu_pct is not None:
        metrics["proxy_cpu_pct"] = cpu_pct
    return metrics


def kernel_bytes() -> int:
    """Kernel memory that grows with sockets, machine-wide: slab (socket,
    inode, file and epoll objects) and TCP buffer pages (/proc/net/sockstat)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    slab = int(meminfo["Slab"].split()[0]) * 1024
    pages = 0
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            pages = int(fields[fields.index("mem") + 1])
    return slab + pages * os.sysconf("SC_PAGE_SIZE")


def measure_idle(ctx: Context, system: System, running: Running,
                 sizes: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Per idle connection at each size, opening the extra connections per step:
    the proxy's RSS (none for direct) and the machine's kernel memory (every
    socket: client, proxy, backend; the report subtracts direct's)."""
    host, port = running.front
    time.sleep(0.3)
    base = rss_bytes(running.pid) if running.pid is not None else 0
    kernel_base = kernel_bytes()
    held: list[Proc] = []
    results: dict[int, dict[str, float]] = {}
    total = 0
    try:
        for size in sizes:
            want = size - total
            client = Proc([*system.prefix(ctx, LOAD_CPUS), sys.executable,
                           str(BENCH_DIR / "holdconns.py"), "client", host, str(port), str(want)],
                          ctx.path(f"hold-client-{size}.log"), "hold-client")
            held.append(client)
            ready = wait_until(lambda c=client: bool(READY.search(c.log.read_text())), 90, 0.1)
            if not ready:
                raise RuntimeError(f"hold client did not report within 90s: {client.tail()}")
            match = READY.search(client.log.read_text())
            assert match
            total += int(match[1])
            time.sleep(0.5)  # let the proxy settle (lazy frees, worker bookkeeping)
            kernel = (kernel_bytes() - kernel_base) / 1024 / max(total, 1)
            results[size] = {"connections": float(total), "kernel_kib_per_conn": kernel}
            if running.pid is not None:
                rss = rss_bytes(running.pid)
                results[size] |= {"rss_mib": rss / 2**20, "base_rss_mib": base / 2**20,
                                  "kib_per_conn": (rss - base) / 1024 / max(total, 1)}
            if total < size:  # a limit was hit: larger sizes reach no further
                break
    finally:
        for client in held:
            client.stop(grace=1)
    return results


# --- C1: control plane --------------------------------------------------------

MIN_SYNC_PERIOD = 1.0  # uproxy's default --min-sync-period, in seconds


def http_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def services_doc(names: list[str], backend_port: int) -> str:
    return json.dumps({"services": [
        {"name": name, "ports": [{"name": "http", "port": 80, "targetPort": backend_port}],
         "endpoints": ["127.0.0.1"]} for name in names]})


def time_change(proc: Proc, services_path: Path, names: list[str], new: list[str],
                backend_port: int, timeout: float) -> tuple[float, float]:
    """Write the services file; seconds until all `new` are in the table, and until they serve."""
    reader = TableReader(proc.log)
    reader.poll()
    reader.table.clear()  # only lines printed after the change count
    tmp = f"{services_path}.tmp"
    with open(tmp, "w") as f:
        f.write(services_doc(names, backend_port))
    wanted = {f"default/{name}" for name in new}
    t0 = time.perf_counter()
    os.replace(tmp, services_path)
    if not wait_until(lambda: wanted <= reader.poll().keys() or not proc.alive(), timeout, 0.002):
        missing = len(wanted - reader.table.keys())
        raise RuntimeError(f"{missing} of {len(wanted)} services not in the table after "
                           f"{timeout:.0f}s; log: {proc.tail(3)}")
    if not proc.alive():
        raise RuntimeError(f"uproxy exited: {proc.tail()}")
    t_table = time.perf_counter() - t0
    sample = [f"default/{new[-1]}"] + [f"default/{name}" for name in new[:: max(1, len(new) // 10)]]
    for name in sample:
        ip, port = reader.table[name]
        if not wait_until(lambda ip=ip, port=port: http_ok(ip, port), timeout, 0.002):
            raise RuntimeError(f"{name} at {ip}:{port} not serving after {timeout:.0f}s")
    return t_table, time.perf_counter() - t0


def measure_control_plane(ctx: Context, system: System, sizes: tuple[int, ...],
                          record: Callable[[str, dict[str, float]], None]) -> None:
    """C1: one uproxy per size; base service, then base + N, then (at the largest) +1."""
    backend, route = start_backend(ctx, system, "http")
    try:
        for size in sizes:
            label = f"C1-{size // 1000}k" if size >= 1000 else f"C1-{size}"
            services = ctx.path("c1-services.yaml")
            services.write_text(services_doc(["c1-base"], route.backend_port))
            proc = Proc([*system.prefix(ctx, PROXY_CPUS), *ctx.uproxy_argv,
                         "--services", str(services), "--bind-range", BIND_RANGE,
                         "--healthz-bind-address", "", "--metrics-bind-address", ""],
                        ctx.path("c1-uproxy.log"), "uproxy")
            try:
                if "default/c1-base" not in wait_for_table(proc, {"default/c1-base"}, 20):
                    raise RuntimeError(f"uproxy did not list c1-base: {proc.tail()}")
                # The base's sync just ran: a change now would wait out the rest
                # of --min-sync-period (1 s by default), the rate limit the user
                # chose, not the work C1 measures. Start the clock after it.
                time.sleep(MIN_SYNC_PERIOD)
                new = [f"c1-{size}-{i:05d}" for i in range(size)]
                t_table, t_serve = time_change(proc, services, ["c1-base", *new], new,
                                               route.backend_port, timeout=120)
                metrics = {"serve_ms": t_serve * 1e3, "table_ms": t_table * 1e3}
                if size == max(sizes):
                    time.sleep(0.3)
                    metrics["rss_mib"] = rss_bytes(proc.pid) / 2**20
                record(label, metrics)
                if size == max(sizes):
                    t_table, t_serve = time_change(
                        proc, services, ["c1-base", *new, "c1-extra"], ["c1-extra"],
                        route.backend_port, timeout=60)
                    record(f"{label}+1", {"serve_ms": t_serve * 1e3, "table_ms": t_table * 1e3})
            finally:
                proc.stop()
    finally:
        backend.stop()


def median(values: list[float]) -> float:
    return statistics.median(values)
