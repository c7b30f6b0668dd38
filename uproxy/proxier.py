"""The Proxier: the single writer of listeners, rules and balancer state.

Every sync folds the tracker's net changes into the current objects, plans
purely (`planner.desired_state`, `planner.diff`) and applies the plan in an
order that never blackholes or resets traffic:

1. open listeners of added ports;
2. publish their endpoints (and those of updated ports) to the balancer;
3. apply the rules in one transaction: this installs the rules of added
   ports, so nothing is steered to a listener before it has endpoints, and
   deletes those of removed ports;
4. close the listeners of removed ports, then forget their balancer state.

Rules are applied on every sync, changed or not: that full pass repairs
rules someone else flushed.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from uproxy.applying import Endpoints, HealthChecks, Listeners
from uproxy.model import (
    HEALTH_CHECK_PORT,
    DesiredPort,
    EndpointSlice,
    Frontend,
    HealthCheck,
    Node,
    ObjectName,
    Service,
    ServicePortName,
    format_hostport,
    health_check_name,
)
from uproxy.planner import DesiredState, Plan, desired_state, diff, update_state
from uproxy.rules.base import Portal, PortalDelta, Rules, RulesError
from uproxy.rules.nodeports import NodePortReservations, node_ports
from uproxy.stats import PortStats
from uproxy.status import RouteView
from uproxy.tracking import Changes, ChangeTracker

log = logging.getLogger("uproxy.proxier")

TableWriter = Callable[[str], None]
RowKey = tuple[str, str, str, str]  # a table row's place: namespace, name, port, protocol


class Proxier:
    def __init__(
        self,
        tracker: ChangeTracker,
        listeners: Listeners[Any],
        rules: Rules,
        endpoints: Endpoints,
        *,
        node_name: str = "",
        proxy_name: str | None = None,
        chain_prefix: str = "UPROXY",
        table_writer: TableWriter | None = None,
        required_sources: tuple[str, ...] = (),
        node_ports: NodePortReservations | None = None,
        routes: RouteView | None = None,
        portforward_streams: Callable[[], int] = lambda: 0,
        health_checks: HealthChecks | None = None,
    ) -> None:
        self.tracker = tracker
        self.listeners = listeners
        self.rules = rules
        self.endpoints = endpoints
        # On a node: the health check node ports' listeners, which the rules
        # reach as node ports (portals named `health_check_name`).
        self.health_check_server = health_checks
        self.node_name = node_name or None
        self.proxy_name = proxy_name
        self.chain_prefix = chain_prefix
        self.services: dict[ObjectName, Service] = {}
        self.slices: dict[ObjectName, EndpointSlice] = {}
        self.nodes: dict[ObjectName, Node] = {}  # this node's, when a source reports it
        self._planned_zone = ""  # the zone the current state was planned for
        self.applied: dict[ServicePortName, DesiredPort] = {}
        self.desired: Mapping[ServicePortName, DesiredPort] = {}
        self._state: DesiredState | None = None
        self._slice_index: dict[ObjectName, dict[ObjectName, EndpointSlice]] = {}
        self.skipped: Mapping[ObjectName, str] = {}
        self._warned: Mapping[ObjectName, str] = {}
        self.rules_failures = 0
        self.last_rules_error: str | None = None
        self.last_sync_seconds: float | None = None
        self._table_writer = table_writer
        # Until every source has delivered a complete view, a sync would plan
        # from half the objects and tear down rules that should stay.
        self.required_sources = required_sources
        # Rules mode holds every node port with a socket so no other program takes it.
        self.node_ports = node_ports
        self.node_port_problems: list[str] = []
        # --dial portforward|auto: how each endpoint is dialled, and the open
        # port-forward streams; both only for observers (status, metrics).
        self.routes = routes
        self._portforward_streams = portforward_streams
        self._last_table: str | None = None
        # The portal of each port as the last rules apply was given it.
        self._offered: dict[ServicePortName, Portal] = {}
        # The table's rows and lines by (namespace, name, port, protocol), the
        # keys in order, the column widths of the lines, and the ports whose
        # row must be made again (None: every one).
        self._rows: dict[RowKey, tuple[str, str, str, str]] = {}
        self._lines: dict[RowKey, str] = {}
        self._order: list[RowKey] = []
        self._widths: tuple[int, ...] = ()
        self._stale_rows: set[ServicePortName] | None = None

    # -- what observers read -------------------------------------------------

    @property
    def rules_name(self) -> str:
        return self.rules.name

    @property
    def portforward_streams(self) -> int:
        return self._portforward_streams()

    @property
    def laptop_mode(self) -> bool:
        return self.listeners.laptop_mode

    @property
    def balancer(self) -> Endpoints:
        """The endpoints side, for the status page's snapshots."""
        return self.endpoints

    @property
    def bound(self) -> Mapping[ServicePortName, tuple[str, int]]:
        return self.listeners.bound

    @property
    def errors(self) -> Mapping[ServicePortName, str]:
        return self.listeners.unserved

    @property
    def stats(self) -> Mapping[ServicePortName, PortStats]:
        return self.listeners.stats

    # -- the sync ------------------------------------------------------------

    @property
    def node(self) -> Node | None:
        """This node's Node object, once a source reported it (kube source in
        rules mode, or a Node in the services file)."""
        if self.node_name is None:
            return None
        return self.nodes.get(ObjectName("", self.node_name))

    @property
    def node_terminating(self) -> bool:
        node = self.node
        return node is not None and node.terminating

    @property
    def health_checks(self) -> Mapping[ObjectName, HealthCheck]:
        """Health check node ports (LoadBalancer, externalTrafficPolicy Local)
        as last planned."""
        return self._state.health_checks if self._state is not None else {}

    @property
    def zone(self) -> str:
        node = self.node
        return node.zone if node is not None else ""

    @property
    def ready(self) -> bool:
        return self.tracker.synced(*self.required_sources)

    async def sync(self) -> Plan:
        if not self.ready:
            return Plan()
        started = time.monotonic()
        changes = self.tracker.take()
        changes.apply_to(self.services, self.slices, self.nodes)
        self._index_slices(changes)
        if changes.empty or self._state is None or self.zone != self._planned_zone:
            # The periodic pass (or the first): plan everything from scratch, in
            # a worker thread. At 10k services that is ~0.5 s of Python which
            # on the loop would stall every connection; the thread hands the
            # GIL back every few ms. Nothing else writes these objects meanwhile
            # (this sync is their only writer, and syncs never overlap). A new
            # zone for this node may change any service's endpoints (hints).
            state, plan = await asyncio.to_thread(self._plan_everything)
        else:
            # Plan only what changed, and the ports that failed to open, so
            # a one-service change costs one service however many there are.
            touched = changes.touched_services() | {n.service for n in self.listeners.unserved}
            state = update_state(
                self._state, self.services,
                {key: list(self._slice_index.get(key, {}).values()) for key in touched},
                touched, node_name=self.node_name, proxy_name=self.proxy_name,
                zone=self._planned_zone,
            )
            plan = diff(self.applied, state.ports, only=touched)
        previous_checks = self.health_checks
        self._state = state
        self.skipped = state.skipped
        self.desired = state.ports
        for key, warning in state.warnings.items():  # each said once, until it changes
            if self._warned.get(key) != warning:
                log.warning("%s", warning)
        self._warned = state.warnings

        # The written order (uproxy.applying): additions open the listener,
        # publish its endpoints, then install the rules that steer traffic to
        # it; removals delete the rules, close the listener, then forget the
        # endpoints. A port whose frontend changed is in both lists: its old
        # listener steps aside so the new one opens first, and closes after
        # the rules moved.
        listeners = self.listeners
        replaced = [listeners.detach(port.name) for port in plan.removed]
        failed = [port for port in plan.added if not self._open(port)]
        self._publish(plan.added + plan.updated)
        if self.health_check_server is not None:  # new checks listen before their rules
            await self.health_check_server.update(state.health_checks)

        # A sync without changes is the periodic pass: have the backend compare
        # with the kernel and repair; a sync with changes may send just those.
        moved = {port.name for port in plan.added + plan.removed}
        moved |= _moved_checks(previous_checks, state.health_checks)
        rules_error = await self._apply_rules(verify=plan.empty,
                                              names=None if plan.empty else moved)
        if self.health_check_server is not None:  # gone checks close after their rules
            await self.health_check_server.retire()

        added = {port.name for port in plan.added}
        for port, listener in zip(plan.removed, replaced, strict=True):
            if port.name not in added:
                self.applied.pop(port.name, None)
            if listener is not None:
                listeners.retire(listener)
        # Ports or addresses the removals just freed may fit what did not open.
        if failed and any(r is not None for r in replaced) and any(
                [self._open(port) for port in failed]):
            self._publish(failed)
            rules_error = await self._apply_rules(verify=False, names=moved)

        gone = {port.name for port in plan.removed if port.name not in state.ports}
        for name in gone:
            self.endpoints.remove(name)
            listeners.forget(name)
        unserved_gone = [name for name in listeners.unserved if name not in state.ports]
        for name in unserved_gone:
            listeners.forget(name)
        self.endpoints.expire_pins()

        if self._stale_rows is not None:
            self._stale_rows.update(port.name for port in plan.added + plan.updated + plan.removed)
            self._stale_rows.update(unserved_gone)
        self.last_sync_seconds = time.monotonic() - started
        if not plan.empty:
            log.info(
                "sync: %d added, %d updated, %d removed; %d ports served, %d not served (%.1f ms)",
                len(plan.added), len(plan.updated), len(plan.removed),
                len(self.listeners.bound), len(self.listeners.unserved),
                self.last_sync_seconds * 1000,
            )
        if not plan.empty or unserved_gone or self._last_table is None:
            self._write_table()
        if rules_error is not None:
            raise rules_error  # the runner retries with backoff; serving goes on
        return plan

    def _plan_everything(self) -> tuple[DesiredState, Plan]:
        self._planned_zone = zone = self.zone
        state = desired_state(self.services, self.slices, node_name=self.node_name,
                              proxy_name=self.proxy_name, zone=zone)
        previous = self._state
        if previous is not None and state == previous:
            # The incremental state was right (as it should be): keep its
            # objects, and let the 10k just made die young instead of
            # filling the collector's oldest generation every periodic pass.
            state = previous
        elif previous is not None:
            changed = {n for n in set(state.ports) | set(previous.ports)
                       if state.ports.get(n) != previous.ports.get(n)}
            log.warning("periodic pass: %d ports differed from the incremental plan "
                        "(now planned from scratch): %s", len(changed),
                        ", ".join(sorted(str(n) for n in changed)[:5]))
        return state, diff(self.applied, state.ports)

    def _index_slices(self, changes: Changes) -> None:
        for key, (previous, current) in changes.slices.items():
            if previous is not None:
                bucket = self._slice_index.get(previous.service)
                if bucket is not None:
                    bucket.pop(key, None)
                    if not bucket:
                        del self._slice_index[previous.service]
            if current is not None:
                self._slice_index.setdefault(current.service, {})[key] = current

    def _publish(self, ports: Sequence[DesiredPort]) -> None:
        """Endpoints to the balancer, for the ports that have a listener."""
        bound = self.listeners.bound
        for port in ports:
            if port.name in bound:
                self.applied[port.name] = port
                self.endpoints.publish(port)

    def _open(self, port: DesiredPort) -> bool:
        if not self.listeners.open(port):
            return False
        self.applied[port.name] = port
        return True

    async def _apply_rules(self, *, verify: bool,
                           names: set[ServicePortName] | None) -> RulesError | None:
        if names is None:  # every port (the periodic pass): off the loop, as the planning
            portals, delta = await asyncio.to_thread(self._portals, None)
        else:
            portals, delta = self._portals(names)
        touches_node_ports = names is None or any(
            portal.frontend.node_port for portal in delta.gone + delta.new)
        if self.node_ports is not None and touches_node_ports:
            problems = self.node_ports.update(node_ports(portals))
            for problem in set(problems) - set(self.node_port_problems):
                log.error("%s", problem)
            self.node_port_problems = problems
        try:
            await self.rules.apply(portals, verify=verify, delta=delta)
        except RulesError as error:
            self.rules_failures += 1
            if str(error) != self.last_rules_error:
                log.error("rules (%s) not applied, previous rules stay: %s", self.rules.name, error)
            self.last_rules_error = str(error)
            return error
        self.last_rules_error = None
        return None

    def _portals(self, names: set[ServicePortName] | None) -> tuple[list[Portal], PortalDelta]:
        """The portals of every open listener, and how they differ from the last apply's.

        `names` are the ports that may have changed since (None: any). An
        unchanged portal stays the very same object, so a backend can tell
        by identity what it has seen; a sync that changes one service costs
        one service here, however many there are.
        """
        current = self._offered
        if names is None:
            names = (set(current) | set(self.applied)
                     | {health_check_name(service) for service in self.health_checks})
        gone: list[Portal] = []
        new: list[Portal] = []
        for name in names:
            old = current.get(name)
            portal = self._portal_of(name)
            if portal == old:
                continue
            if old is not None:
                gone.append(old)
                del current[name]
            if portal is not None:
                new.append(portal)
                current[name] = portal
        return list(current.values()), PortalDelta(tuple(gone), tuple(new))

    def _portal_of(self, name: ServicePortName) -> Portal | None:
        """A port's portal: its frontend and its listener; None without either."""
        if name.port == HEALTH_CHECK_PORT and self.health_check_server is not None:
            check = self.health_checks.get(name.service)
            address = self.health_check_server.bound.get(name.service)
            if check is None or address is None:
                return None
            # A node port and nothing else: the node-port rules REDIRECT it.
            frontend = Frontend(name, check.node_port, "TCP", node_port=check.node_port)
            return Portal(frontend, *address)
        port = self.applied.get(name)
        listener = self.listeners.bound.get(name)
        return Portal(port.frontend, *listener) if port is not None and listener is not None \
            else None

    # -- the table users read ------------------------------------------------

    def table(self) -> str:
        """One line per service port: `ns/name  port/proto  ->  IP:port  (N endpoints)`.

        In rules mode IP:port is the first cluster IP and the service port (what
        clients dial), and the parenthesis adds `, proxy ADDRESS` (the listener
        the rules redirect to).

        Rows and their lines are kept between syncs, in order; a sync makes
        again only the rows of the ports it touched (all lines only when a
        column's width changes). At 10k ports making the whole table took
        ~145 ms a change.
        """
        stale = self._refresh_rows()
        if not self._rows:
            return "(no services)\n"
        widths = tuple(max(map(len, column))
                       for column in list(zip(*self._rows.values(), strict=True))[:3])
        if widths != self._widths:
            self._widths, stale = widths, set(self._rows)
            self._lines.clear()
        w0, w1, w2 = widths
        for key in stale:
            row = self._rows.get(key)
            if row is None:
                self._lines.pop(key, None)
            else:
                self._lines[key] = f"{row[0]:<{w0}}  {row[1]:<{w1}}  ->  {row[2]:<{w2}}  {row[3]}\n"
        return "".join(self._lines[key] for key in self._order)

    def _refresh_rows(self) -> set[RowKey]:
        """Make the stale rows again; their keys."""
        stale, self._stale_rows = self._stale_rows, set()
        if stale is None:
            self._rows.clear()
            self._order.clear()
            stale = set(self.desired)
        keys: set[RowKey] = set()
        new: list[RowKey] = []
        for name in stale:
            key = (name.namespace, name.name, name.port, name.protocol)
            keys.add(key)
            port = self.desired.get(name)
            if port is None:
                if self._rows.pop(key, None) is not None:
                    del self._order[bisect.bisect_left(self._order, key)]
                continue
            if key not in self._rows:
                new.append(key)
            listener = self.listeners.bound.get(name)
            where = f"{port.frontend.port}/{name.protocol.lower()}"
            if listener is not None:
                count = len(port.endpoints)
                plural = "endpoint" if count == 1 else "endpoints"
                reached = address = format_hostport(*listener)
                note = ""
                if not self.laptop_mode and port.frontend.cluster_ips:
                    # Rules mode: clients use the cluster IP; the proxy port is where
                    # the rules bring them.
                    reached = format_hostport(port.frontend.cluster_ips[0], port.frontend.port)
                    note = f", proxy {address}"
                self._rows[key] = (f"{name.namespace}/{name.name}", where, reached,
                                   f"({count} {plural}{note})")
            else:
                self._rows[key] = (f"{name.namespace}/{name.name}", where, "not served",
                                   f"({self.listeners.unserved.get(name, 'unknown error')})")
        if new:  # one sort, not an insort each: 10k insorts cost ~50 ms, a sort ~5
            self._order.extend(new)
            self._order.sort()
        return keys

    def _write_table(self) -> None:
        if self._table_writer is None:
            return
        text = self.table()
        if text != self._last_table:
            self._last_table = text
            self._table_writer(text)

    # -- shutdown ------------------------------------------------------------

    async def remove_rules(self) -> None:
        if self.node_ports is not None:
            self.node_ports.close()
        try:
            await self.rules.cleanup()
        except RulesError as error:
            log.error("rules (%s) cleanup failed: %s", self.rules.name, error)


def _moved_checks(before: Mapping[ObjectName, HealthCheck],
                  after: Mapping[ObjectName, HealthCheck]) -> set[ServicePortName]:
    """The health checks whose node port came, went or changed: their portals move."""
    def port_of(checks: Mapping[ObjectName, HealthCheck], service: ObjectName) -> int | None:
        check = checks.get(service)
        return None if check is None else check.node_port

    return {health_check_name(service) for service in set(before) | set(after)
            if port_of(before, service) != port_of(after, service)}
