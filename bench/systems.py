"""The systems under test: how to start each one in front of a scenario's backend.

Every scenario has one route: a protocol and a backend port on 127.0.0.1. A
system returns the address clients should use instead (the front) and the PID
whose process tree is "the proxy" for CPU and RSS. Proxies run on CPU 0
(`taskset -c 0`); two-worker/thread systems get CPUs 0-1 and so share CPU 1
with the load generator and backend, which always run on CPU 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, wait_until

BENCH_DIR = Path(__file__).resolve().parent
PROXY_CPUS = "0"
LOAD_CPUS = "1"
BOTH_CPUS = "0,1"
FRONT_OFFSET = 10_000  # a proxy listens on backend port + 10000
VIP = "198.18.1.10"
NS_ADDR = "198.18.0.1"
BIND_RANGE = "127.77.0.0/16"

# `namespace/name  port/proto  ->  IP:port  (N endpoints)` (the laptop table uproxy prints)
TABLE_LINE = re.compile(
    r"(?P<svc>[\w.-]+/[\w.-]+)\s+(?P<port>\d+)/(?P<proto>TCP|UDP|SCTP)\s+(?:->|→)\s+"
    r"(?P<ip>[\d.]+):(?P<fport>\d+)\s+\((?P<n>\d+) endpoints?\)", re.IGNORECASE)


class SkipSystem(Exception):
    """The system cannot run here (e.g. a flag it rejects); skip it for the rest of the run."""


@dataclass(frozen=True)
class Route:
    proto: str  # "tcp" | "udp"
    backend_port: int

    @property
    def front_port(self) -> int:
        return self.backend_port + FRONT_OFFSET


@dataclass
class Context:
    """What systems share during one run."""

    workdir: Path
    netns: str | None  # the harness's namespace for REDIRECT mode, if made
    uproxy_argv: list[str]
    uproxy_help: str  # `uproxy --help` output, "" when it does not run
    uproxy_error: str = ""
    counter: int = 0

    def path(self, stem: str) -> Path:
        self.counter += 1
        return self.workdir / f"{self.counter:04d}-{stem}"


@dataclass
class Running:
    front: tuple[str, int]
    pid: int | None  # proxy process tree root; None for direct
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class System:
    name = ""
    in_netns = False
    workers = 1
    pinning = ""
    opt_in = False  # not in the default --systems list

    def prefix(self, ctx: Context, cpus: str) -> list[str]:
        argv = ["ip", "netns", "exec", ctx.netns] if self.in_netns and ctx.netns else []
        return [*argv, "taskset", "-c", cpus]

    def unavailable(self, ctx: Context) -> str | None:
        """Why this system cannot run at all here, or None."""
        return None

    def not_applicable(self, scenario: str) -> str | None:
        return None

    def start(self, ctx: Context, route: Route) -> Running:
        raise NotImplementedError

    def _spawn(self, ctx: Context, argv: list[str], stem: str) -> Proc:
        return Proc([*self.prefix(ctx, BOTH_CPUS if self.workers > 1 else PROXY_CPUS), *argv],
                    ctx.path(f"{self.name}-{stem}.log"), self.name)

    def _ready(self, ctx: Context, route: Route, front: tuple[str, int], proc: Proc,
               timeout: float = 15.0) -> None:
        probe = [*self.prefix(ctx, LOAD_CPUS), sys.executable, str(BENCH_DIR / "probe.py"),
                 route.proto, front[0], str(front[1]), "--timeout", "1"]
        deadline = time.monotonic() + timeout
        ok = False
        while not ok and proc.alive() and time.monotonic() < deadline:
            ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
        if not ok or not proc.alive():
            tail = proc.tail()
            proc.stop()
            state = "running" if proc.popen.returncode is None else f"exit {proc.popen.returncode}"
            raise RuntimeError(f"{self.name} not serving {front[0]}:{front[1]} after "
                               f"{timeout:.0f}s ({state}); log: {tail}")
        time.sleep(0.2)  # let the probe's backend connection finish before the load starts


class Direct(System):
    name = "direct"
    pinning = "no proxy; client and backend on cpu 1"

    def not_applicable(self, scenario: str) -> str | None:
        # S5: no proxy RSS, but the kernel memory of the client's and the
        # backend's sockets, which the report subtracts from each proxy's.
        return "no proxy process" if scenario.startswith("C1") else None

    def start(self, ctx: Context, route: Route) -> Running:
        return Running(("127.0.0.1", route.backend_port), None)


class Socat(System):
    name = "socat"
    pinning = "cpu 0 (forks a process per connection)"

    def unavailable(self, ctx: Context) -> str | None:
        return None if shutil.which("socat") else "socat not installed (bench/install.sh)"

    def not_applicable(self, scenario: str) -> str | None:
        if scenario.startswith("S5"):
            return "forks a process per connection (MiBs each)"
        return "not a service proxy" if scenario.startswith("C1") else None

    def start(self, ctx: Context, route: Route) -> Running:
        front = ("127.0.0.1", route.front_port)
        if route.proto == "tcp":
            argv = ["socat", f"TCP-LISTEN:{route.front_port},bind=127.0.0.1,reuseaddr,fork,"
                    "backlog=4096", f"TCP:127.0.0.1:{route.backend_port}"]
        else:
            argv = ["socat", f"UDP-LISTEN:{route.front_port},bind=127.0.0.1,reuseaddr,fork",
                    f"UDP:127.0.0.1:{route.backend_port}"]
        proc = self._spawn(ctx, argv, "proxy")
        self._ready(ctx, route, front, proc)
        return Running(front, proc.pid, [proc])


class HAProxy(System):
    def __init__(self, threads: int) -> None:
        self.workers = threads
        self.name = f"haproxy-{threads}t"
        self.pinning = "cpu 0" if threads == 1 else "cpus 0-1 (2 threads, shared with load)"

    def unavailable(self, ctx: Context) -> str | None:
        return None if shutil.which("haproxy") else "haproxy not installed (bench/install.sh)"

    def not_applicable(self, scenario: str) -> str | None:
        if scenario.startswith("S4"):
            return "no UDP"
        return "not a service proxy" if scenario.startswith("C1") else None

    def start(self, ctx: Context, route: Route) -> Running:
        front = ("127.0.0.1", route.front_port)
        conf = ctx.path(f"{self.name}.cfg")
        conf.write_text(f"""global
    nbthread {self.workers}
    maxconn 9900
    maxpipes 50
    tune.bufsize 65536
    tune.maxrewrite 1024
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option splice-request
    option splice-response
listen bench
    bind 127.0.0.1:{route.front_port}
    server backend 127.0.0.1:{route.backend_port}
""")
        proc = self._spawn(ctx, ["haproxy", "-db", "-f", str(conf)], "proxy")
        self._ready(ctx, route, front, proc)
        return Running(front, proc.pid, [proc])


class NginxStream(System):
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.name = f"nginx-{workers}w"
        self.pinning = "cpu 0" if workers == 1 else "cpus 0-1 (2 workers, shared with load)"

    def unavailable(self, ctx: Context) -> str | None:
        if not shutil.which("nginx"):
            return "nginx not installed (bench/install.sh)"
        return None if STREAM_MODULE.exists() else "libnginx-mod-stream not installed"

    def not_applicable(self, scenario: str) -> str | None:
        return "not a service proxy" if scenario.startswith("C1") else None

    def start(self, ctx: Context, route: Route) -> Running:
        front = ("127.0.0.1", route.front_port)
        listen = f"127.0.0.1:{route.front_port}{' udp' if route.proto == 'udp' else ''} reuseport"
        server = f"""server {{
        listen {listen};
        proxy_pass 127.0.0.1:{route.backend_port};
        proxy_buffer_size 64k;
        proxy_timeout 300s;
    }}"""
        proc = start_nginx(ctx, self.name, self.workers, f"stream {{\n    {server}\n}}",
                           self.prefix(ctx, BOTH_CPUS if self.workers > 1 else PROXY_CPUS))
        self._ready(ctx, route, front, proc)
        return Running(front, proc.pid, [proc])


STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def start_nginx(ctx: Context, name: str, workers: int, body: str, prefix: list[str]) -> Proc:
    """An nginx of our own: own prefix, foreground master, no logs but critical errors."""
    root = ctx.path(f"{name}-nginx")
    (root / "logs").mkdir(parents=True)
    conf = root / "nginx.conf"
    load = f"load_module {STREAM_MODULE};\n" if "stream {" in body else ""
    conf.write_text(f"""{load}daemon off;
user root;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {root}/nginx.pid;
error_log {root}/logs/error.log crit;
events {{ worker_connections 20000; multi_accept on; }}
{body}
""")
    argv = ["nginx", "-p", str(root), "-c", str(conf), "-e", f"{root}/logs/error.log"]
    return Proc([*prefix, *argv], ctx.path(f"{name}.log"), name)


class Uproxy(System):
    """uproxy in laptop mode (own loopback IP per service) or REDIRECT mode in a netns."""

    def __init__(self, mode: str, workers: int = 1, relay: str = "",
                 metrics: bool = False) -> None:
        self.mode = mode  # "laptop" | "redirect"
        self.workers = workers
        # "" (uproxy's default, the hybrid) | "splice" | "protocol" | "sockmap"
        self.relay = relay
        # metrics: serve /metrics and scrape it every second during the run, to
        # show what observability costs the data path (issue 6: under 3%).
        self.metrics = metrics
        self.opt_in = bool(relay) or metrics
        self.in_netns = mode == "redirect"
        self.name = "uproxy" if mode == "laptop" else "uproxy-redirect"
        if workers > 1:
            self.name += f"-{workers}w"
        if relay:
            self.name += f"-{relay}"
        if metrics:
            self.name += "-metrics"
        self.pinning = ("cpu 0" if workers == 1 else "cpus 0-1 (2 workers, shared with load)")
        if self.in_netns:
            self.pinning += ", in the harness's network namespace"

    def unavailable(self, ctx: Context) -> str | None:
        if not ctx.uproxy_help:
            return f"uproxy command not runnable yet ({ctx.uproxy_error})"
        if self.workers > 1 and "--workers" not in ctx.uproxy_help:
            return "uproxy has no --workers yet"
        if self.relay and "--relay" not in ctx.uproxy_help:
            return "uproxy has no --relay yet"
        if self.relay == "sockmap" and os.geteuid() != 0:
            return "--relay sockmap needs root (bpf); without it uproxy relays as auto"
        if self.mode == "redirect":
            if "--rules" not in ctx.uproxy_help or "iptables" not in ctx.uproxy_help:
                return "uproxy has no --rules iptables yet"
            if not ctx.netns:
                return "needs root and `ip netns` for REDIRECT mode"
        return None

    def not_applicable(self, scenario: str) -> str | None:
        if scenario.startswith("C1") and (self.mode != "laptop" or self.workers > 1
                                          or self.relay or self.metrics):
            return "C1 runs in laptop mode, 1 worker"
        if self.relay and scenario.startswith("S4"):
            return "--relay is the TCP data path"
        return None

    def start(self, ctx: Context, route: Route) -> Running:
        proto = route.proto.upper()
        service: dict[str, object] = {
            "name": "bench",
            "ports": [{"name": "p", "port": route.front_port, "targetPort": route.backend_port,
                       "protocol": proto}],
            "endpoints": ["127.0.0.1"],
        }
        if self.mode == "redirect":
            service["clusterIP"] = VIP
        services = ctx.path(f"{self.name}-services.yaml")
        services.write_text(json.dumps({"services": [service]}))
        metrics_bind = "127.0.0.1:0" if self.metrics else ""
        argv = [*ctx.uproxy_argv, "--services", str(services),
                "--healthz-bind-address", "", "--metrics-bind-address", metrics_bind]
        if self.mode == "laptop":
            argv += ["--bind-range", BIND_RANGE]
        else:
            argv += ["--rules", "iptables"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        if self.relay:
            argv += ["--relay", self.relay]
        proc = self._spawn(ctx, argv, "proxy")
        if self.mode == "laptop":
            table = wait_for_table(proc, {"default/bench"}, timeout=20)
            if "default/bench" not in table:
                tail = proc.tail()
                proc.stop()
                if self.workers > 1 and "--workers" in tail:
                    raise SkipSystem(f"uproxy rejects --workers {self.workers}: {tail}")
                raise RuntimeError(f"uproxy printed no table line for default/bench; log: {tail}")
            front = table["default/bench"]
        else:
            front = (VIP, route.front_port)
        self._ready(ctx, route, front, proc)
        if self.metrics:
            start_scraper(proc)
        return Running(front, proc.pid, [proc])


def start_scraper(proc: Proc, interval: float = 1.0) -> None:
    """GET /metrics and /status.json every `interval` until the proxy is gone."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r"metrics listening on (http://\S+)",
                              proc.log.read_text(errors="replace"))
        return bool(found) or not proc.alive()

    wait_until(logged, 10)
    if not found:
        raise RuntimeError(f"uproxy logged no metrics address; log: {proc.tail()}")
    url = found[0]

    def scrape() -> None:
        while proc.alive():
            try:
                for path in ("/metrics", "/status.json"):
                    with urllib.request.urlopen(url + path, timeout=5) as response:
                        response.read()
            except OSError:
                return
            time.sleep(interval)

    threading.Thread(target=scrape, name="metrics-scraper", daemon=True).start()


class TableReader:
    """Follows a uproxy log file and collects `service -> (ip, port)` from table lines."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.partial = b""
        self.table: dict[str, tuple[str, int]] = {}

    def poll(self) -> dict[str, tuple[str, int]]:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self.table
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            match = TABLE_LINE.search(raw.decode(errors="replace"))
            if match:
                self.table[match["svc"]] = (match["ip"], int(match["fport"]))
        return self.table


def wait_for_table(proc: Proc, names: set[str], timeout: float) -> dict[str, tuple[str, int]]:
    reader = TableReader(proc.log)
    wait_until(lambda: names <= reader.poll().keys() or not proc.alive(), timeout)
    return reader.table


def all_systems() -> list[System]:
    return [Direct(), Uproxy("laptop"), Uproxy("laptop", 2), Uproxy("redirect"),
            HAProxy(1), HAProxy(2), NginxStream(1), NginxStream(2), Socat(),
            Uproxy("laptop", relay="splice"), Uproxy("laptop", relay="protocol"),
            Uproxy("laptop", relay="sockmap"), Uproxy("laptop", metrics=True)]
