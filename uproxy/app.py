"""Wiring: builds the parts from Settings, owns every task, orders shutdown.

Start: load the source's first view (a bad services file is a one-line
fatal error), check that the rule backend can work here (privilege, host
firewall), open the web servers, then run the source, the sync runner and
the housekeeping loop in one TaskGroup.

Shutdown, in this order: remove kernel rules (traffic stops arriving), stop
accepting (listeners close), let open connections drain for
--shutdown-grace, close what is left, stop the tasks, close the web
servers. It runs in a `finally`, whatever ended the serving: SIGTERM/SIGINT
(exit 0), or a task that raised, which is a bug: its traceback is logged
once and the exit code is 1. Only SIGKILL leaves rules behind, and the next
start replaces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from uproxy.balancer import Balancer
from uproxy.bpf.sockmap import fell_back as sockmap_fell_back
from uproxy.healthchecks import HealthCheckServer
from uproxy.heap import collector_paused
from uproxy.hostsfile import render_hosts, write_hosts
from uproxy.listeners import ListenerPool
from uproxy.logs import AccessLog
from uproxy.metrics import Metrics
from uproxy.model import ServicePortName
from uproxy.picking import Picker
from uproxy.portforward.connection import Relay
from uproxy.proxier import Proxier
from uproxy.rules.base import Rules, RulesError
from uproxy.rules.nodeports import NodePortReservations
from uproxy.runner import SyncRunner
from uproxy.settings import Settings
from uproxy.sources.base import Source
from uproxy.stats import PortStats
from uproxy.tracking import ChangeTracker
from uproxy.web import WebBindError, WebServer, WebState, health, start_web
from uproxy.workers import WorkerGroup

log = logging.getLogger("uproxy")


class StartupError(Exception):
    """uproxy cannot start; the message is the one line users see."""


def make_rules(settings: Settings) -> Rules:
    from uproxy.rules.select import make_rules as select

    try:
        return select(
            settings.rules_backend, settings.rules.chain_prefix,
            laptop_mode=settings.listeners.laptop_mode,
        )
    except (RulesError, ValueError) as error:  # e.g. iptc on an nf_tables host
        raise StartupError(str(error)) from None


def make_forward(settings: Settings, source: Source) -> Relay | None:
    """--dial portforward|auto: the dialer (with the configuration the
    Kubernetes source loads at start) and the routes; None for direct."""
    mode = settings.listeners.dial
    if mode == "direct":
        return None
    from uproxy.dialing import DialRoutes
    from uproxy.portforward.dialer import Dialer
    from uproxy.sources.kube import KubeSource

    if not isinstance(source, KubeSource):
        raise StartupError(f"--dial {mode}: needs the Kubernetes source")
    kube = source
    return Relay(Dialer(lambda: kube.configuration), DialRoutes(mode))


def make_source(settings: Settings) -> Source:
    if settings.source.services_path is not None:
        from uproxy.sources.file import FileSource

        return FileSource(settings.source.services_path)
    from uproxy.sources.kube import KubeSource, label_selector

    return KubeSource(
        kubeconfig=settings.source.kubeconfig,
        master=settings.source.master,
        context=settings.source.context,
        namespaces=settings.source.namespaces,
        label_selector=label_selector(settings.source.service_proxy_name),
        # A laptop is no node: its own Node matters on a node only.
        node_name=None if settings.listeners.laptop_mode else settings.source.node_name,
    )


@dataclass
class Parts:
    """Everything a running uproxy is made of; tests build and poke these."""

    settings: Settings
    source: Source
    tracker: ChangeTracker
    balancer: Balancer
    pool: ListenerPool
    rules: Rules
    proxier: Proxier
    runner: SyncRunner
    metrics: Metrics
    access_log: AccessLog | None = None
    workers: WorkerGroup | None = None  # --workers N > 1
    forward: Relay | None = None  # --dial portforward|auto
    web_state: WebState | None = None
    health_checks: HealthCheckServer | None = None  # rules mode: healthCheckNodePorts
    web_servers: list[WebServer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)


def build(
    settings: Settings,
    *,
    source: Source | None = None,
    rules: Rules | None = None,
    table_writer: Callable[[str], None] | None = None,
    access_log: Callable[[dict[str, object]], None] | None = None,
    freeze_heap: bool = False,
) -> Parts:
    """Every part, wired. `freeze_heap` (the real process, not tests that run
    many instances in one interpreter): after the first complete sync, move
    every object alive into the collector's permanent generation (see sync)."""
    settings = resolve_relay(settings)
    # --workers N > 1: worker processes serve the sockets; this balancer tells them.
    workers = WorkerGroup(settings) if settings.listeners.workers > 1 else None
    balancer = workers.balancer if workers is not None else Balancer()
    if access_log is None and settings.logs.verbose >= 1:
        access_log = AccessLog()

    def make_picker(name: ServicePortName, stats: PortStats) -> Picker:
        return balancer.picker(name, stats)

    tracker = ChangeTracker()
    rules = rules if rules is not None else make_rules(settings)
    source = source if source is not None else make_source(settings)
    forward = make_forward(settings, source)
    pool = ListenerPool(settings.listeners, make_picker, access_log=access_log,
                        make_server=workers.make_server if workers is not None else None,
                        forward=forward)
    # A laptop is no node: no load balancer probes it. `web_state` is made below.
    health_checks = None if settings.listeners.laptop_mode else HealthCheckServer(
        lambda: health(web_state)[0])
    proxier = Proxier(
        tracker, pool, rules, balancer,
        health_checks=health_checks,
        required_sources=(source.name,),
        node_ports=NodePortReservations() if rules.name not in ("none", "fake") else None,
        node_name=settings.source.node_name,
        proxy_name=settings.source.service_proxy_name,
        chain_prefix=settings.rules.chain_prefix,
        table_writer=table_writer,
        routes=forward.routes if forward is not None else None,
        portforward_streams=(lambda: forward.dialer.streams) if forward is not None
        else (lambda: 0),
    )

    hosts_file = settings.source.hosts_file
    metrics = Metrics(proxier)

    heap_to_freeze = freeze_heap

    async def sync() -> None:
        nonlocal heap_to_freeze
        started = time.monotonic()
        try:
            with collector_paused():  # a sync may make objects by the 100k, none in cycles
                plan = await proxier.sync()
        except RulesError:
            metrics.sync.rules_apply_failed()
            raise
        if forward is not None:  # --dial auto: probe the pod networks new endpoints are in
            forward.routes.observe(e for port in plan.added + plan.updated
                                   for e in port.endpoints)
        if proxier.ready:
            metrics.sync.observe_sync(time.monotonic() - started)
            if heap_to_freeze:
                # The first complete state (every service, slice, listener) lives
                # about as long as the process. Left to the cyclic collector, each
                # full collection walks all of it, on the loop: 150-180 ms stalls
                # at 10k services. Frozen, a full collection walks only what came
                # after (~15 ms). Model objects hold no cycles, so the frozen ones
                # that later go are still freed by their reference counts.
                heap_to_freeze = False
                gc.collect()
                gc.freeze()
        if hosts_file is not None and settings.listeners.laptop_mode:
            addresses = {name.service: ip for name, (ip, _) in proxier.bound.items()}
            await asyncio.to_thread(write_hosts, hosts_file, render_hosts(addresses))

    runner = SyncRunner(sync, settings.sync.min_sync_period, settings.sync.sync_period,
                        transient=(RulesError,))
    tracker.notify = runner.request
    web_state = WebState(
        proxier=proxier, runner=runner, tracker=tracker,
        required_sources=frozenset(proxier.required_sources),
        sync_period=settings.sync.sync_period, metrics=metrics,
        node_terminating=lambda: proxier.node_terminating,
    )
    return Parts(
        settings=settings,
        source=source,
        tracker=tracker, balancer=balancer, pool=pool, rules=rules,
        proxier=proxier, runner=runner, metrics=metrics,
        access_log=access_log if isinstance(access_log, AccessLog) else None,
        workers=workers,
        forward=forward,
        web_state=web_state,
        health_checks=health_checks,
    )


async def load_initial(parts: Parts) -> None:
    """What a source must do before anything listens: read the services file
    (a bad one is fatal at start), load the kubeconfig (a bad one likewise)."""
    try:
        parts.source.load_initial()
        await parts.source.prepare()
    except Exception as error:  # the source's one-line message
        raise StartupError(str(error)) from None


def copy_source_counters(parts: Parts) -> None:
    """Source counters into the metrics (sources keep plain ints of their own)."""
    counters = parts.metrics.sources
    for source, error in parts.tracker.errors.items():
        counters.errors[source] = error.count
    source = parts.source.name
    kept = parts.source.counters()
    for mine, theirs in ((counters.watch_restarts, kept.watch_restarts),
                         (counters.relists, kept.relists),
                         (counters.list_pages, kept.list_pages),
                         (counters.expired_lists, kept.expired_lists)):
        for resource, count in theirs.items():
            mine[(source, resource)] = count


async def housekeeping(parts: Parts, interval: float = 1.0) -> None:
    while True:
        copy_source_counters(parts)
        parts.balancer.expire_pins()
        await asyncio.sleep(interval)


async def start_web_servers(parts: Parts) -> list[WebServer]:
    settings = parts.settings
    state = parts.web_state
    assert state is not None
    servers: list[WebServer] = []
    try:
        for bind, kind in ((settings.web.healthz_bind, "healthz"),
                           (settings.web.metrics_bind, "metrics")):
            server = await start_web(bind, kind, state)  # type: ignore[arg-type]  # Literal
            if server is not None:
                servers.append(server)
    except WebBindError as error:
        for server in servers:
            await server.close()
        raise StartupError(str(error)) from None
    return servers


def resolve_relay(settings: Settings) -> Settings:
    """--relay sockmap where this host cannot load it: say why once, relay with auto."""
    if settings.listeners.relay_mode != "sockmap" or not sockmap_fell_back(log):
        return settings
    return replace(settings, listeners=replace(settings.listeners, relay_mode="auto"))


async def preflight(parts: Parts) -> None:
    """The rule backend's check: a missing privilege is a one-line startup
    error; what it finds wrong with the host is said once, as a warning."""
    try:
        warnings = await parts.rules.preflight()
    except RulesError as error:
        raise StartupError(str(error)) from None
    for warning in warnings:
        log.warning("%s", warning)


async def run(parts: Parts) -> None:
    """Serve until `parts.stop` is set or a task fails, then shut down in order."""
    await load_initial(parts)
    await preflight(parts)
    loop = asyncio.get_running_loop()
    parts.web_servers = await start_web_servers(parts)
    try:
        if parts.workers is not None:
            await parts.workers.start()
        try:
            await _serve(parts, loop)
        finally:
            await shutdown(parts)
    finally:
        if parts.workers is not None and not parts.workers.stopping:
            await parts.workers.stop(0.0)
        for server in parts.web_servers:
            await server.close()
        if parts.health_checks is not None:
            await parts.health_checks.close()
    log.info("stopped")


async def shutdown(parts: Parts) -> None:
    """Rules first (no packet is steered to a closed listener), then stop
    accepting, drain for --shutdown-grace, and close what is left."""
    grace = parts.settings.shutdown_grace
    log.info("shutting down: removing rules, closing listeners, draining connections")
    await parts.proxier.remove_rules()
    parts.pool.stop_accepting()
    if parts.workers is not None and not parts.workers.stopping:  # they drain their own
        await parts.workers.stop(grace)
    open_now = parts.pool.open_by_protocol()
    if any(open_now.values()):
        what = [_count(open_now["TCP"], "TCP connection"), _count(open_now["UDP"], "UDP session")]
        log.info("draining %s for up to %.1fs", " and ".join(w for w in what if w), grace)
        await parts.pool.drain(grace)
    parts.pool.abort()
    if parts.forward is not None:
        await parts.forward.routes.close()
        await parts.forward.dialer.close()
    if parts.access_log is not None:
        parts.access_log.flush()


async def _serve(parts: Parts, loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.ExitStack() as signals:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, parts.stop.set)
            signals.callback(loop.remove_signal_handler, number)
        # Sources that cannot reload ignore it (SIGHUP would otherwise end the process).
        loop.add_signal_handler(signal.SIGHUP, parts.source.reload)
        signals.callback(loop.remove_signal_handler, signal.SIGHUP)

        async with asyncio.TaskGroup() as tasks:
            source_task = tasks.create_task(parts.source.run(parts.tracker), name="source")
            runner_task = tasks.create_task(parts.runner.run(), name="sync-runner")
            helpers = [tasks.create_task(housekeeping(parts), name="housekeeping")]
            if parts.access_log is not None:
                helpers.append(tasks.create_task(parts.access_log.run(), name="access-log"))
            if parts.workers is not None:
                helpers.append(tasks.create_task(parts.workers.supervise(), name="workers"))
            await parts.stop.wait()
            source_task.cancel()
            # Let a sync that is running finish before the parts are torn down.
            while parts.runner.in_sync:
                await asyncio.sleep(0.01)
            runner_task.cancel()
            for helper in helpers:
                helper.cancel()


def print_table(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(settings: Settings) -> int:
    from uproxy.logs import setup_logging

    setup_logging("json" if settings.logs.format == "json" else "text", settings.logs.verbose)
    try:
        parts = build(settings, table_writer=print_table, freeze_heap=True)
        asyncio.run(run(parts))
    except StartupError as error:
        print(f"uproxy: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug; the shutdown in run() has removed the rules
        cause = _cause(error)
        log.critical("uproxy stopped on an unexpected error (a bug; rules were removed): "
                     "%s: %s", type(cause).__name__, cause, exc_info=cause)
        return 1
    return 0


def _count(number: int, thing: str) -> str:
    """'1 TCP connection', '2 TCP connections', '' for none."""
    return "" if not number else f"{number} {thing}{'' if number == 1 else 's'}"


def _cause(error: BaseException) -> BaseException:
    """The first real error inside TaskGroup's exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def cleanup(settings: Settings) -> int:
    from uproxy.rules.select import cleanup_all

    kinds = () if settings.rules.backend in ("auto",) else (settings.rules.backend,)
    try:
        removed = asyncio.run(cleanup_all(settings.rules.chain_prefix, kinds))
    except (RulesError, ValueError) as error:
        print(f"uproxy: error: {error}", file=sys.stderr)
        return 1
    for line in removed:
        print(line)
    return 0
