"""Rules mode with the in-memory rules backend: proxy ports, the order of
listeners and rules, failures of the backend."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from tests.integration.apphelpers import Backends, running_uproxy, tcp_exchange, write_services
from uproxy.rules.base import Portal, PortalDelta
from uproxy.rules.fake import FakeRules


def _accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if ip == "0.0.0.0" else ip, port), timeout=1):
            return True
    except OSError:
        return False


class OrderCheckingRules(FakeRules):
    """Records, at every apply, which listeners accept connections."""

    def __init__(self) -> None:
        super().__init__()
        self.listening_at_apply: list[dict[str, bool]] = []
        self.previous: tuple[Portal, ...] = ()

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        seen = {str(p.frontend.name): _accepts(p.proxy_ip, p.proxy_port) for p in portals}
        # Portals being removed by this apply: their listener must still be open.
        for old in self.previous:
            if old not in portals:
                seen[f"removed {old.frontend.name}"] = _accepts(old.proxy_ip, old.proxy_port)
        self.listening_at_apply.append(seen)
        await super().apply(portals, verify=verify, delta=delta)
        self.previous = tuple(portals)



def _service(name: str, vip: str, port: int) -> dict[str, object]:
    return {"name": name, "clusterIP": vip, "ports": [{"port": 80}],
            "endpoints": [f"127.0.0.1:{port}"]}


async def test_listeners_open_before_rules_and_close_after(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [_service("a", "198.18.1.1", port), _service("b", "198.18.1.2", port)])
    rules = OrderCheckingRules()
    async with running_uproxy(services, "--rules", "none", "--bind-address", "127.0.0.1",
                              rules=rules) as up:
        assert {str(p.frontend.name) for p in rules.portals} == {"default/a", "default/b"}
        assert all(rules.listening_at_apply[-1].values())
        for portal in rules.portals:
            assert portal.proxy_ip == "127.0.0.1"
            assert await tcp_exchange((portal.proxy_ip, portal.proxy_port)) == b"b:ping"
        # The table says where clients go (the cluster IP) and where rules bring them.
        proxy = {str(p.frontend.name): f"127.0.0.1:{p.proxy_port}" for p in rules.portals}
        assert up.tables[-1].splitlines() == [
            f"default/a  80/tcp  ->  198.18.1.1:80  (1 endpoint, proxy {proxy['default/a']})",
            f"default/b  80/tcp  ->  198.18.1.2:80  (1 endpoint, proxy {proxy['default/b']})",
        ]

        write_services(services, [_service("a", "198.18.1.1", port)])
        await up.reload()
        last = rules.listening_at_apply[-1]
        assert last == {"default/a": True, "removed default/b": True}
        (remaining,) = rules.portals
        assert str(remaining.frontend.name) == "default/a"
        assert remaining.frontend.cluster_ips == ("198.18.1.1",)
        # The change came with a delta (what left), exactly the lists' difference.
        assert rules.deltas >= 1 and rules.bad_deltas == []


async def test_proxy_port_range_exhaustion_leaves_others_serving(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [_service(f"s{i}", f"198.18.1.{i + 1}", port) for i in range(3)])
    rules = FakeRules()
    async with running_uproxy(services, "--bind-address", "127.0.0.1",
                              "--proxy-port-range", "21400-21401", rules=rules) as up:
        assert sorted(p.proxy_port for p in rules.portals) == [21400, 21401]
        (error,) = up.parts.pool.errors.values()
        assert "--proxy-port-range 21400-21401" in error
        assert "not served" in up.tables[-1]
        for portal in rules.portals:
            assert await tcp_exchange(("127.0.0.1", portal.proxy_port)) == b"b:ping"

        # Freeing a port lets the waiting service in on the next sync.
        write_services(services, [_service(f"s{i}", f"198.18.1.{i + 1}", port) for i in (1, 2)])
        await up.reload()
        assert not up.parts.pool.errors
        assert len(rules.portals) == 2
        # Two applies in that sync (removal, then the freed port reused): both deltas exact.
        assert rules.deltas >= 2 and rules.bad_deltas == []

        # A service that never got a port, then deleted: its row goes from the table.
        write_services(services, [_service(f"s{i}", f"198.18.1.{i + 1}", port) for i in (1, 2, 3)])
        await up.reload()
        assert "default/s3" in up.tables[-1] and "not served" in up.tables[-1]
        write_services(services, [_service(f"s{i}", f"198.18.1.{i + 1}", port) for i in (1, 2)])
        await up.reload()
        assert "default/s3" not in up.tables[-1] and "not served" not in up.tables[-1]
        assert up.tables[-1].count("\n") == 2


async def test_a_failing_rules_backend_keeps_serving_and_retries(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [_service("a", "198.18.1.1", port)])
    rules = FakeRules()
    async with running_uproxy(services, "--bind-address", "127.0.0.1", rules=rules) as up:
        applies = rules.applies
        rules.fail_next = "line 3: iptables-restore: bad rule"
        write_services(services, [_service("a", "198.18.1.1", port),
                                  _service("b", "198.18.1.2", port)])
        up.parts.source.reload()  # type: ignore[attr-defined]
        await up.wait_for(lambda: up.parts.proxier.rules_failures == 1)
        assert up.parts.proxier.last_rules_error == "line 3: iptables-restore: bad rule"
        (listener,) = [lst for name, lst in up.parts.pool.listeners.items()
                       if str(name) == "default/a"]
        assert await tcp_exchange(("127.0.0.1", listener.port)) == b"b:ping"
        # The runner retries with backoff (1 s first) and the next apply succeeds.
        await up.wait_for(lambda: rules.applies > applies and len(rules.portals) == 2, timeout=5)
        assert up.parts.proxier.last_rules_error is None


async def test_rules_are_removed_at_shutdown_before_listeners_close(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [_service("a", "198.18.1.1", port)])
    rules = FakeRules()
    async with running_uproxy(services, "--bind-address", "127.0.0.1", rules=rules) as up:
        (portal,) = rules.portals
        listener = up.parts.pool.listeners[portal.frontend.name]
        original_stop = listener.server.stop_accepting
        order: list[str] = []

        def stop_accepting() -> None:
            order.append(f"listener closed after {rules.cleanups} cleanups")
            original_stop()

        listener.server.stop_accepting = stop_accepting  # type: ignore[method-assign]
    assert rules.cleanups == 1
    assert order == ["listener closed after 1 cleanups"]


class RequestingRules(FakeRules):
    """At every apply, a full request through each portal that comes or goes:
    the moment the kernel would steer (or stop steering) traffic to it."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[str, bytes | str]] = []
        self.previous: tuple[Portal, ...] = ()

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        changed = [(f"new {p.frontend.name}", p) for p in portals if p not in self.previous]
        changed += [(f"gone {p.frontend.name}", p) for p in self.previous if p not in portals]
        for label, portal in changed:
            try:
                answer: bytes | str = await tcp_exchange((portal.proxy_ip, portal.proxy_port))
            except OSError as error:
                answer = type(error).__name__
            self.answers.append((label, answer))
        await super().apply(portals, verify=verify, delta=delta)
        self.previous = tuple(portals)


async def test_a_port_serves_whole_requests_from_the_moment_rules_steer_to_it(
    tmp_path: Path, backends: Backends
) -> None:
    """Additions: listener, endpoints, then rules. Removals: rules, then the
    listener and the endpoints. A request in the window gets an answer."""
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [_service("a", "198.18.1.1", port)])
    rules = RequestingRules()
    async with running_uproxy(services, "--bind-address", "127.0.0.1", rules=rules) as up:
        assert rules.answers == [("new default/a", b"b:ping")]

        write_services(services, [_service("a", "198.18.1.1", port),
                                  _service("b", "198.18.1.2", port)])
        await up.reload()
        assert rules.answers[1:] == [("new default/b", b"b:ping")]

        write_services(services, [_service("b", "198.18.1.2", port)])
        await up.reload()
        assert rules.answers[2:] == [("gone default/a", b"b:ping")]
