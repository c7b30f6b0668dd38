"""Proxy port and laptop IP allocation."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uproxy.allocators import AddressAllocator, ExhaustedError, PortAllocator
from uproxy.durations import PortRange
from uproxy.model import ObjectName


def test_ports_are_unique_until_exhausted_then_clear_error() -> None:
    allocator = PortAllocator(PortRange(40000, 40009), random.Random(1))
    ports = {allocator.allocate() for _ in range(10)}
    assert ports == set(range(40000, 40010))
    with pytest.raises(ExhaustedError, match=r"--proxy-port-range 40000-40009: all 10 ports"):
        allocator.allocate()
    allocator.release(40004)
    assert allocator.allocate() == 40004


def test_ports_avoid_those_that_failed_to_bind() -> None:
    allocator = PortAllocator(PortRange(40000, 40001), random.Random(3))
    assert allocator.allocate(avoid=frozenset({40000})) == 40001
    with pytest.raises(ExhaustedError):
        allocator.allocate(avoid=frozenset({40000}))


def test_ports_start_at_a_random_spot() -> None:
    firsts = {PortAllocator(PortRange(1000, 1999), random.Random(seed)).allocate()
              for seed in range(20)}
    assert len(firsts) > 10


def test_laptop_ips_are_stable_across_restarts() -> None:
    network = ipaddress.ip_network("127.77.0.0/16")
    names = [ObjectName("default", f"svc{i}") for i in range(50)]
    first = AddressAllocator(network)
    one = {name: first.allocate(name) for name in names}
    second = AddressAllocator(network)
    two = {name: second.allocate(name) for name in reversed(names)}
    assert one == two
    assert len(set(one.values())) == 50
    assert all(ipaddress.ip_address(ip) in network for ip in one.values())
    assert "127.77.0.0" not in one.values() and "127.77.255.255" not in one.values()


def test_laptop_range_exhaustion_names_the_flag() -> None:
    allocator = AddressAllocator(ipaddress.ip_network("127.77.0.0/30"))  # two usable
    allocator.allocate(ObjectName("a", "1"))
    allocator.allocate(ObjectName("a", "2"))
    with pytest.raises(ExhaustedError, match=r"--bind-range 127\.77\.0\.0/30"):
        allocator.allocate(ObjectName("a", "3"))
    allocator.release(ObjectName("a", "1"))
    assert allocator.allocate(ObjectName("a", "3"))


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30, unique=True))
def test_laptop_ips_never_collide(names: list[str]) -> None:
    allocator = AddressAllocator(ipaddress.ip_network("127.77.0.0/27"))
    taken = [allocator.allocate(ObjectName("ns", name)) for name in names]
    assert len(set(taken)) == len(taken)


@pytest.mark.parametrize("cidr", ["127.77.0.0/16", "10.0.0.0/31", "fd00:77::/112"])
def test_laptop_ips_are_written_as_ipaddress_writes_them(cidr: str) -> None:
    """Addresses are made from integers; each must read as ipaddress prints it
    (the hosts file, the table and the bind all use the text)."""
    network = ipaddress.ip_network(cidr)
    allocator = AddressAllocator(network)
    names = [ObjectName("ns", f"s{i}") for i in range(min(200, network.num_addresses))]
    for name in names:
        ip = allocator.allocate(name)
        assert str(ipaddress.ip_address(ip)) == ip
        assert ipaddress.ip_address(ip) in network
