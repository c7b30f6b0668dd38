"""Balancer: kube-proxy's userspace roundrobin_test.go, ported, plus properties.

kube-proxy reads the shuffled order from the balancer's internals; here the
same order comes from `snapshot(name).endpoints`. Endpoints that were
"endpoint1:40" there are Endpoint("10.0.0.1", 40) here.
"""

from __future__ import annotations

import gc
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.balancer import Balancer
from uproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    DesiredPort,
    Endpoint,
    Frontend,
    ServicePortName,
)
from uproxy.picking import NoEndpointsError, Picker
from uproxy.stats import PortStats
from uproxy.workers.messages import Message, PortUpdate, WorkerConfig, decode, encode
from uproxy.workers.supervisor import WorkerBalancer
from uproxy.workers.worker import Worker

AFFINITY = float(DEFAULT_AFFINITY_TIMEOUT)
CLIENT1, CLIENT2, CLIENT3 = "127.0.0.1", "127.0.0.2", "127.0.0.3"
CLIENT4, CLIENT5, CLIENT6 = "127.0.0.4", "127.0.0.5", "127.0.0.6"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spn(name: str = "foo", port: str = "p") -> ServicePortName:
    return ServicePortName("testnamespace", name, port)


def ep(host: int, port: int) -> Endpoint:
    return Endpoint(f"10.0.0.{host}", port)


def order(lb: Balancer, name: ServicePortName) -> tuple[Endpoint, ...]:
    return lb.snapshot(name).endpoints


def expect(lb: Balancer, name: ServicePortName, expected: Endpoint, client: str = "") -> None:
    assert lb.pick(name, client) == expected


def expect_reset(lb: Balancer, name: ServicePortName, expected: Endpoint, client: str) -> None:
    assert lb.pick(name, client, reset_affinity=True) == expected


def no_endpoints(lb: Balancer, name: ServicePortName) -> bool:
    try:
        lb.pick(name, CLIENT1)
    except NoEndpointsError:
        return True
    return False


# --- kube-proxy: TestLoadBalance* -------------------------------------------------


def test_load_balance_fails_with_no_endpoints() -> None:
    lb = Balancer()
    assert no_endpoints(lb, spn(port="does-not-exist"))
    lb.update(spn(), [], None)
    assert no_endpoints(lb, spn())


def test_load_balance_works_with_single_endpoint() -> None:
    lb = Balancer()
    service = spn()
    assert no_endpoints(lb, service)
    lb.update(service, [ep(1, 40)], None)
    for _ in range(4):
        expect(lb, service, ep(1, 40))


def test_load_balance_works_with_multiple_endpoints() -> None:
    lb = Balancer()
    service = spn()
    assert no_endpoints(lb, service)
    lb.update(service, [Endpoint("10.0.0.9", p) for p in (1, 2, 3)], None)
    shuffled = order(lb, service)
    assert set(shuffled) == {Endpoint("10.0.0.9", p) for p in (1, 2, 3)}
    for i in (0, 1, 2, 0):
        expect(lb, service, shuffled[i])


def test_load_balance_works_with_multiple_endpoints_multiple_ports() -> None:
    lb = Balancer()
    service_p, service_q = spn(port="p"), spn(port="q")
    assert no_endpoints(lb, service_p)
    lb.update(service_p, [ep(1, 1), ep(2, 1), ep(3, 3)], None)
    lb.update(service_q, [ep(1, 2), ep(2, 2), ep(3, 4)], None)

    shuffled = order(lb, service_p)
    assert set(shuffled) == {ep(1, 1), ep(2, 1), ep(3, 3)}
    for i in (0, 1, 2, 0):
        expect(lb, service_p, shuffled[i])

    shuffled = order(lb, service_q)
    assert set(shuffled) == {ep(1, 2), ep(2, 2), ep(3, 4)}
    for i in (0, 1, 2, 0):
        expect(lb, service_q, shuffled[i])


def test_load_balance_works_with_multiple_endpoints_and_updates() -> None:
    lb = Balancer()
    service_p, service_q = spn(port="p"), spn(port="q")
    assert no_endpoints(lb, service_p)
    lb.update(service_p, [ep(1, 1), ep(2, 2), ep(3, 3)], None)
    lb.update(service_q, [ep(1, 10), ep(2, 20), ep(3, 30)], None)

    for service in (service_p, service_q):
        shuffled = order(lb, service)
        assert len(shuffled) == 3
        for i in (0, 1, 2, 0):
            expect(lb, service, shuffled[i])

    # One fewer endpoint: start from the beginning again.
    lb.update(service_p, [ep(4, 4), ep(5, 5)], None)
    lb.update(service_q, [ep(4, 40), ep(5, 50)], None)
    shuffled = order(lb, service_p)
    assert set(shuffled) == {ep(4, 4), ep(5, 5)}
    for i in (0, 1, 0, 1):
        expect(lb, service_p, shuffled[i])
    shuffled = order(lb, service_q)
    assert set(shuffled) == {ep(4, 40), ep(5, 50)}
    for i in (0, 1, 0, 1):
        expect(lb, service_q, shuffled[i])

    # Clear endpoints.
    lb.update(service_p, [], None)
    assert no_endpoints(lb, service_p)


def test_load_balance_works_with_service_removal() -> None:
    lb = Balancer()
    foo, bar = spn("foo"), spn("bar")
    assert no_endpoints(lb, foo)
    lb.update(foo, [ep(1, 123), ep(2, 123), ep(3, 123)], None)
    lb.update(bar, [ep(4, 456), ep(5, 456), ep(6, 456)], None)
    shuffled_foo = order(lb, foo)
    for i in (0, 1, 2, 0, 1):
        expect(lb, foo, shuffled_foo[i])
    shuffled_bar = order(lb, bar)
    for i in (0, 1, 2, 0, 1):
        expect(lb, bar, shuffled_bar[i])

    lb.remove(foo)
    assert no_endpoints(lb, foo)
    # bar is still there, and continues where it left off.
    for i in (2, 0, 1, 2):
        expect(lb, bar, shuffled_bar[i])


# --- kube-proxy: TestStickyLoadBalance* -------------------------------------------


def _sticky_three_clients(lb: Balancer, service: ServicePortName) -> None:
    ep1 = lb.pick(service, CLIENT1)
    for _ in range(3):
        expect(lb, service, ep1, CLIENT1)
    ep2 = lb.pick(service, CLIENT2)
    for _ in range(3):
        expect(lb, service, ep2, CLIENT2)
    ep3 = lb.pick(service, CLIENT3)
    for _ in range(3):
        expect(lb, service, ep3, CLIENT3)
    assert len({ep1, ep2, ep3}) == 3
    for _ in range(2):
        expect(lb, service, ep1, CLIENT1)
        expect(lb, service, ep2, CLIENT2)
        expect(lb, service, ep3, CLIENT3)


def test_sticky_load_balance_works_with_new_service_called_first() -> None:
    lb = Balancer()
    service = spn(port="")
    assert no_endpoints(lb, service)
    # Affinity known first (an empty port), endpoints second.
    lb.update(service, [], AFFINITY)
    lb.update(service, [ep(1, 1), ep(2, 2), ep(3, 3)], AFFINITY)
    _sticky_three_clients(lb, service)


def test_sticky_load_balance_works_with_new_service_called_second() -> None:
    lb = Balancer()
    service = spn(port="")
    assert no_endpoints(lb, service)
    # Endpoints first, affinity second: the order must not change.
    lb.update(service, [ep(1, 1), ep(2, 2), ep(3, 3)], None)
    before = order(lb, service)
    lb.update(service, [ep(1, 1), ep(2, 2), ep(3, 3)], AFFINITY)
    assert order(lb, service) == before
    _sticky_three_clients(lb, service)


def test_sticky_load_balance_works_with_multiple_endpoints_remove_one() -> None:
    lb = Balancer()
    service = spn(port="")
    assert no_endpoints(lb, service)
    lb.update(service, [Endpoint("10.0.0.9", p) for p in (1, 2, 3)], AFFINITY)
    shuffled = order(lb, service)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[1], CLIENT2)
    expect(lb, service, shuffled[1], CLIENT2)
    expect(lb, service, shuffled[2], CLIENT3)
    client_endpoint = {CLIENT1: shuffled[0], CLIENT2: shuffled[1], CLIENT3: shuffled[2]}

    removed = Endpoint("10.0.0.9", 3)
    lb.update(service, [Endpoint("10.0.0.9", p) for p in (1, 2)], AFFINITY)
    shuffled = order(lb, service)
    # Only the client of the removed endpoint moves; it takes the next in order.
    for client, endpoint in client_endpoint.items():
        if endpoint == removed:
            client_endpoint[client] = shuffled[0]
    for client in (CLIENT1, CLIENT2, CLIENT3):
        expect(lb, service, client_endpoint[client], client)

    lb.update(service, [Endpoint("10.0.0.9", p) for p in (1, 2, 4)], AFFINITY)
    shuffled = order(lb, service)
    for client in (CLIENT1, CLIENT2, CLIENT3):
        expect(lb, service, client_endpoint[client], client)
    expect(lb, service, shuffled[0], CLIENT4)
    expect(lb, service, shuffled[1], CLIENT5)
    expect(lb, service, shuffled[2], CLIENT6)


def test_sticky_load_balance_works_with_multiple_endpoints_and_updates() -> None:
    lb = Balancer()
    service = spn(port="")
    assert no_endpoints(lb, service)
    lb.update(service, [Endpoint("10.0.0.9", p) for p in (1, 2, 3)], AFFINITY)
    shuffled = order(lb, service)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[1], CLIENT2)
    expect(lb, service, shuffled[1], CLIENT2)
    expect(lb, service, shuffled[2], CLIENT3)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[1], CLIENT2)

    # Every endpoint replaced: every pin goes, and round-robin starts over.
    lb.update(service, [Endpoint("10.0.0.9", p) for p in (4, 5)], AFFINITY)
    shuffled = order(lb, service)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[1], CLIENT2)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[0], CLIENT1)
    expect(lb, service, shuffled[1], CLIENT2)
    expect(lb, service, shuffled[1], CLIENT2)

    lb.update(service, [], AFFINITY)
    assert no_endpoints(lb, service)


def test_sticky_load_balance_works_with_service_removal() -> None:
    lb = Balancer()
    foo, bar = spn("foo", ""), spn("bar", "")
    assert no_endpoints(lb, foo)
    lb.update(foo, [Endpoint("10.0.0.9", p) for p in (1, 2, 3)], AFFINITY)
    lb.update(bar, [Endpoint("10.0.0.9", p) for p in (4, 5)], AFFINITY)

    shuffled_foo = order(lb, foo)
    expect(lb, foo, shuffled_foo[0], CLIENT1)
    expect(lb, foo, shuffled_foo[1], CLIENT2)
    expect(lb, foo, shuffled_foo[2], CLIENT3)
    expect(lb, foo, shuffled_foo[0], CLIENT1)
    expect(lb, foo, shuffled_foo[0], CLIENT1)
    expect(lb, foo, shuffled_foo[1], CLIENT2)
    expect(lb, foo, shuffled_foo[1], CLIENT2)
    expect(lb, foo, shuffled_foo[2], CLIENT3)
    expect(lb, foo, shuffled_foo[2], CLIENT3)

    shuffled_bar = order(lb, bar)
    expect(lb, bar, shuffled_bar[0], CLIENT1)
    expect(lb, bar, shuffled_bar[1], CLIENT2)
    expect(lb, bar, shuffled_bar[0], CLIENT1)
    expect(lb, bar, shuffled_bar[0], CLIENT1)
    expect(lb, bar, shuffled_bar[1], CLIENT2)
    expect(lb, bar, shuffled_bar[1], CLIENT2)

    lb.remove(foo)
    assert no_endpoints(lb, foo)

    # bar keeps its order and its pins.
    assert order(lb, bar) == shuffled_bar
    for _ in range(2):
        expect(lb, bar, shuffled_bar[0], CLIENT1)
        expect(lb, bar, shuffled_bar[1], CLIENT2)
    expect(lb, bar, shuffled_bar[0], CLIENT1)
    expect(lb, bar, shuffled_bar[0], CLIENT1)


def test_sticky_load_balance_works_with_endpoint_fails() -> None:
    lb = Balancer()
    service = spn(port="")
    assert no_endpoints(lb, service)
    lb.update(service, [ep(1, 1), ep(2, 2), ep(3, 3)], AFFINITY)

    ep1 = lb.pick(service, CLIENT1)
    ep2 = lb.pick(service, CLIENT2)
    ep3 = lb.pick(service, CLIENT3)

    # A failed dial retries with reset: the client moves on in round-robin order.
    expect_reset(lb, service, ep1, CLIENT1)
    expect_reset(lb, service, ep2, CLIENT1)
    expect_reset(lb, service, ep3, CLIENT1)

    expect(lb, service, ep2, CLIENT2)
    expect_reset(lb, service, ep1, CLIENT2)
    expect_reset(lb, service, ep2, CLIENT3)
    expect_reset(lb, service, ep3, CLIENT1)
    expect_reset(lb, service, ep1, CLIENT2)
    expect_reset(lb, service, ep2, CLIENT3)
    # The reset pins stick.
    expect(lb, service, ep3, CLIENT1)
    expect(lb, service, ep1, CLIENT2)
    expect(lb, service, ep2, CLIENT3)


# --- beyond kube-proxy's file ----------------------------------------------------


def test_sticky_session_expires_after_timeout_of_idleness() -> None:
    clock = FakeClock()
    lb = Balancer(clock=clock, shuffle=lambda endpoints: None)
    service = spn()
    lb.update(service, [ep(1, 80), ep(2, 80)], 10.0)
    assert lb.pick(service, CLIENT1) == ep(1, 80)

    # Used again within the timeout: the pin is refreshed, not expired.
    clock.now += 9.0
    assert lb.pick(service, CLIENT1) == ep(1, 80)
    clock.now += 9.0
    assert lb.pick(service, CLIENT1) == ep(1, 80)
    view = lb.snapshot(service)
    assert view.pins == ((CLIENT1, ep(1, 80), 10.0),)

    # Idle for the full timeout: the pin is ignored and replaced.
    clock.now += 10.0
    assert lb.snapshot(service).pins == ()
    assert lb.pick(service, CLIENT1) == ep(2, 80)
    assert lb.pick(service, CLIENT1) == ep(2, 80)


def test_expire_pins_purges_only_idle_pins() -> None:
    clock = FakeClock()
    lb = Balancer(clock=clock, shuffle=lambda endpoints: None)
    sticky, plain = spn("sticky"), spn("plain")
    lb.update(sticky, [ep(1, 80), ep(2, 80)], 5.0)
    lb.update(plain, [ep(3, 80)], None)
    lb.pick(sticky, CLIENT1)
    clock.now += 3.0
    lb.pick(sticky, CLIENT2)
    lb.pick(plain, CLIENT1)
    clock.now += 2.5  # CLIENT1 idle 5.5 s, CLIENT2 idle 2.5 s
    assert lb.expire_pins() == 1
    view = lb.snapshot(sticky)
    assert [(ip, endpoint) for ip, endpoint, _ in view.pins] == [(CLIENT2, ep(2, 80))]
    assert view.pins[0][2] == pytest.approx(2.5)
    assert lb.snapshot(plain).pins == ()


def test_turning_affinity_off_drops_pins_and_keeps_order() -> None:
    lb = Balancer()
    service = spn()
    lb.update(service, [ep(1, 80), ep(2, 80), ep(3, 80)], AFFINITY)
    before = order(lb, service)
    lb.pick(service, CLIENT1)
    lb.update(service, [ep(1, 80), ep(2, 80), ep(3, 80)], None)
    view = lb.snapshot(service)
    assert view.endpoints == before
    assert view.pins == ()
    assert view.next_index == 1  # same endpoints: the position is kept
    assert lb.pick(service, CLIENT1) == before[1]


def test_unchanged_endpoints_in_another_order_keep_position() -> None:
    lb = Balancer(shuffle=lambda endpoints: None)
    service = spn()
    lb.update(service, [ep(1, 80), ep(2, 80), ep(3, 80)], None)
    assert lb.pick(service, CLIENT1) == ep(1, 80)
    lb.update(service, [ep(3, 80), ep(1, 80), ep(2, 80)], None)
    assert lb.pick(service, CLIENT1) == ep(2, 80)


def test_duplicate_endpoints_are_listed_once() -> None:
    lb = Balancer(shuffle=lambda endpoints: None)
    service = spn()
    lb.update(service, [ep(1, 80), ep(1, 80), ep(2, 80)], None)
    assert order(lb, service) == (ep(1, 80), ep(2, 80))


def test_picker_is_a_bound_picker_and_counts_picks() -> None:
    lb = Balancer(shuffle=lambda endpoints: None)
    service = spn()
    stats = PortStats()
    picker: Picker = lb.picker(service, stats)
    with pytest.raises(NoEndpointsError):
        picker.pick(CLIENT1)
    assert stats.picks == {}
    lb.update(service, [ep(1, 80), ep(2, 80)], None)
    got = [picker.pick(CLIENT1) for _ in range(5)]
    assert got == [ep(1, 80), ep(2, 80), ep(1, 80), ep(2, 80), ep(1, 80)]
    assert stats.picks == {"10.0.0.1:80": 3, "10.0.0.2:80": 2}
    assert not hasattr(picker, "__dict__")


def test_picker_follows_port_removal_and_re_adding() -> None:
    lb = Balancer(shuffle=lambda endpoints: None)
    service = spn()
    picker = lb.picker(service)
    lb.update(service, [ep(1, 80)], None)
    assert picker.pick(CLIENT1) == ep(1, 80)
    lb.remove(service)
    with pytest.raises(NoEndpointsError):
        picker.pick(CLIENT1)
    lb.update(service, [ep(2, 80)], None)
    assert picker.pick(CLIENT1) == ep(2, 80)


def test_snapshot_of_unknown_port_is_empty() -> None:
    view = Balancer().snapshot(spn())
    assert view.endpoints == ()
    assert view.pins == ()
    assert view.affinity_timeout is None


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(min_value=1, max_value=12),
    n=st.integers(min_value=0, max_value=200),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    clients=st.lists(st.sampled_from([CLIENT1, CLIENT2, CLIENT3, "::1"]), min_size=1),
)
def test_round_robin_is_fair(k: int, n: int, seed: int, clients: list[str]) -> None:
    shuffler = random.Random(seed)
    lb = Balancer(shuffle=shuffler.shuffle)
    service = spn()
    endpoints = [ep(i, 80) for i in range(1, k + 1)]
    lb.update(service, endpoints, None)
    counts = dict.fromkeys(endpoints, 0)
    for i in range(n):
        counts[lb.pick(service, clients[i % len(clients)])] += 1
    assert sum(counts.values()) == n
    assert all(n // k <= c <= -(-n // k) for c in counts.values())


@settings(max_examples=100, deadline=None)
@given(
    before=st.sets(st.integers(1, 8), min_size=1),
    after=st.sets(st.integers(1, 8), min_size=1),
)
def test_update_keeps_exactly_the_pins_to_surviving_endpoints(
    before: set[int], after: set[int]
) -> None:
    lb = Balancer()
    service = spn()
    lb.update(service, [ep(i, 80) for i in before], AFFINITY)
    pinned = {f"127.0.1.{i}": lb.pick(service, f"127.0.1.{i}") for i in range(len(before))}
    lb.update(service, [ep(i, 80) for i in after], AFFINITY)
    kept = {ip: endpoint for ip, endpoint, _ in lb.snapshot(service).pins}
    assert kept == {ip: e for ip, e in pinned.items() if int(e.ip.rsplit(".", 1)[1]) in after}
    for ip, endpoint in kept.items():
        assert lb.pick(service, ip) == endpoint


# --- externalTrafficPolicy: Local: external traffic's own endpoints ------------

VIP = "198.18.1.10"
LOCAL, REMOTE = ep(1, 80), ep(2, 80)


def no_shuffle() -> Balancer:
    return Balancer(shuffle=lambda endpoints: None)


def test_external_traffic_picks_only_its_own_endpoints() -> None:
    lb, name = no_shuffle(), spn()
    lb.update(name, [LOCAL, REMOTE], None, external_endpoints=[LOCAL], cluster_ips=[VIP])
    assert [lb.pick(name, CLIENT1) for _ in range(4)] == [LOCAL, REMOTE, LOCAL, REMOTE]
    assert [lb.pick_external(name, CLIENT1) for _ in range(3)] == [LOCAL] * 3
    # Each kind keeps its own round-robin position.
    assert lb.pick(name, CLIENT1) == LOCAL
    view = lb.snapshot(name)
    assert view.endpoints == (LOCAL, REMOTE) and view.external_endpoints == (LOCAL,)
    assert view.cluster_ips == (VIP,)


def test_no_local_endpoint_refuses_external_traffic_only() -> None:
    lb, name = no_shuffle(), spn()
    lb.update(name, [REMOTE], None, external_endpoints=[], cluster_ips=[VIP])
    with pytest.raises(NoEndpointsError):
        lb.pick_external(name, CLIENT1)
    assert lb.pick(name, CLIENT1) == REMOTE
    # A local endpoint appears: external traffic is served again.
    lb.update(name, [LOCAL, REMOTE], None, external_endpoints=[LOCAL], cluster_ips=[VIP])
    assert lb.pick_external(name, CLIENT1) == LOCAL


def test_without_external_endpoints_external_traffic_shares_the_cluster_state() -> None:
    lb, name = no_shuffle(), spn()
    lb.update(name, [LOCAL, REMOTE], None)
    assert [lb.pick_external(name, CLIENT1), lb.pick(name, CLIENT1)] == [LOCAL, REMOTE]
    assert lb.snapshot(name).external_endpoints is None
    with pytest.raises(NoEndpointsError):
        lb.pick_external(spn("unknown"), CLIENT1)


def test_affinity_pins_are_kept_per_kind_of_traffic() -> None:
    clock = FakeClock()
    lb, name = Balancer(clock=clock, shuffle=lambda endpoints: None), spn()
    lb.update(name, [LOCAL, REMOTE], AFFINITY, external_endpoints=[LOCAL], cluster_ips=[VIP])
    lb.pick(name, CLIENT1)  # CLIENT2 would otherwise get LOCAL through the cluster IP
    assert lb.pick(name, CLIENT2) == REMOTE
    assert lb.pick_external(name, CLIENT2) == LOCAL  # not the cluster pin to REMOTE
    assert [lb.pick(name, CLIENT2) for _ in range(3)] == [REMOTE] * 3
    view = lb.snapshot(name)
    assert [(c, e) for c, e, _ in view.external_pins] == [(CLIENT2, LOCAL)]
    # A retry after a failed dial moves the external pin within the external endpoints.
    assert lb.pick_external(name, CLIENT2, reset_affinity=True) == LOCAL
    # Pins of both kinds expire.
    clock.now += AFFINITY
    assert lb.expire_pins() == 3
    assert lb.snapshot(name).external_pins == ()


def test_removing_a_local_endpoint_repins_only_its_external_clients() -> None:
    other = ep(3, 80)
    lb, name = no_shuffle(), spn()
    lb.update(name, [LOCAL, other, REMOTE], AFFINITY, external_endpoints=[LOCAL, other],
              cluster_ips=[VIP])
    assert lb.pick_external(name, CLIENT1) == LOCAL
    assert lb.pick_external(name, CLIENT2) == other
    lb.update(name, [other, REMOTE], AFFINITY, external_endpoints=[other], cluster_ips=[VIP])
    assert lb.pick_external(name, CLIENT2) == other
    assert lb.pick_external(name, CLIENT1) == other


def test_picker_split_tells_cluster_from_external_destinations() -> None:
    lb, name = no_shuffle(), spn()
    picker = lb.picker(name, PortStats())  # the listener opens before endpoints are published
    split = picker.split
    assert not split.active
    lb.update(name, [LOCAL, REMOTE], None, external_endpoints=[LOCAL],
              cluster_ips=[VIP, "fd00:18::10"])
    assert picker.split is split and split.active
    assert not split.is_external(bytes([198, 18, 1, 10]))
    assert not split.is_external(bytes.fromhex("fd000018" + "0" * 22 + "10"))
    assert split.is_external(bytes([198, 18, 3, 1]))  # a node port on the node's address
    assert split.is_external(bytes([198, 18, 2, 10]))  # an external IP
    assert picker.pick_external(CLIENT1) == LOCAL
    assert picker.pick(CLIENT1) == LOCAL and picker.pick(CLIENT1) == REMOTE
    # Policy back to Cluster: one state again, and listeners stop asking.
    lb.update(name, [LOCAL, REMOTE], None, cluster_ips=[VIP])
    assert not split.active
    lb.update(name, [LOCAL, REMOTE], None, external_endpoints=[LOCAL], cluster_ips=[VIP])
    assert split.active
    lb.remove(name)
    assert not split.active
    # A port added again: pickers that live on and new ones share one split.
    lb.update(name, [REMOTE], None, external_endpoints=[], cluster_ips=[VIP])
    assert split.active and lb.picker(name).split is split
    with pytest.raises(NoEndpointsError):
        picker.pick_external(CLIENT1)


def test_a_picker_made_after_the_update_knows_the_split() -> None:
    lb, name = no_shuffle(), spn()
    lb.update(name, [LOCAL, REMOTE], None, external_endpoints=[LOCAL], cluster_ips=[VIP])
    split = lb.picker(name).split
    assert split.active and not split.is_external(bytes([198, 18, 1, 10]))
    del split
    gc.collect()
    assert len(lb._splits) == 0  # no picker holds it: nothing kept per port


def test_publish_takes_everything_from_a_planned_port() -> None:
    lb, name = no_shuffle(), spn()
    port = DesiredPort(Frontend(name, 80, "TCP", (VIP,), node_port=30080), (LOCAL, REMOTE),
                       60.0, (LOCAL,))
    lb.publish(port)
    view = lb.snapshot(name)
    assert view.endpoints == (LOCAL, REMOTE) and view.external_endpoints == (LOCAL,)
    assert view.affinity_timeout == 60.0 and view.cluster_ips == (VIP,)
    assert lb.picker(name).split.active


def test_external_endpoints_travel_to_workers_and_to_a_restarted_worker() -> None:
    """--workers: the control process's balancer sends each change as a
    message (through its wire encoding here); a worker's balancer ends up
    with the same split."""
    sent: list[Message] = []
    control = WorkerBalancer(lambda message: sent.append(decode(encode(message))))
    name = spn()
    control.update(name, [LOCAL, REMOTE], None, external_endpoints=[LOCAL], cluster_ips=[VIP])
    worker = Worker(0, WorkerConfig())
    picker = worker.balancer.picker(name)
    worker.on_message(sent[-1], [])
    assert picker.split.active and not picker.split.is_external(bytes([198, 18, 1, 10]))
    assert picker.pick_external(CLIENT1) == LOCAL
    assert sorted(worker.balancer.snapshot(name).endpoints) == [LOCAL, REMOTE]
    # What a restarted worker is sent: built from the control process's snapshot.
    view = control.snapshot(name)
    again = PortUpdate(name, view.endpoints, view.affinity_timeout, view.external_endpoints,
                       view.cluster_ips)
    assert (again.external, again.cluster_ips) == ((LOCAL,), (VIP,))
    last = sent[-1]
    assert isinstance(last, PortUpdate) and sorted(again.endpoints) == sorted(last.endpoints)
    # Back to Cluster: the message says nothing external, the worker stops splitting.
    control.update(name, [LOCAL, REMOTE], None, cluster_ips=[VIP])
    last = sent[-1]
    assert isinstance(last, PortUpdate) and last.external is None
    worker.on_message(last, [])
    assert not picker.split.active
