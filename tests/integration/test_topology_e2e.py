"""Topology hints end to end: a services file with a Node, an EndpointSlice with
zone and node hints, and real connections that reach only this zone's pods;
the Node's zone changes and new connections follow."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import yaml

from tests.integration.apphelpers import Backends, running_uproxy, tcp_exchange

LAPTOP = ("--bind-range", "127.77.0.0/16", "--hostname-override", "node-1")


def objects(zone: str, ports: dict[str, int], node_hint: bool = False) -> list[dict[str, Any]]:
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default"},
               "spec": {"trafficDistribution": "PreferSameZone",
                        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}}
    zones = {"a1": "zone-a", "a2": "zone-a", "b1": "zone-b"}
    endpoints = []
    for tag in ports:
        hints: dict[str, Any] = {"forZones": [{"name": zones[tag]}]}
        if node_hint:
            hints["forNodes"] = [{"name": "node-1" if tag == "a2" else "node-2"}]
        endpoints.append({"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                          "hints": hints, "targetRef": {"kind": "Pod", "name": tag}})
    # One slice per endpoint: each pod listens on its own port here.
    slices = [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": f"web-{tag}", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": ports[tag], "protocol": "TCP"}],
               "endpoints": [endpoint]}
              for tag, endpoint in zip(ports, endpoints, strict=True)]
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": zone}}}
    other = {"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": "node-2", "labels": {"topology.kubernetes.io/zone": "zone-b"}}}
    return [service, *slices, node, other]


def write(path: Path, docs: list[dict[str, Any]]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    temporary.replace(path)


async def tags_of(address: tuple[str, int], count: int = 6) -> collections.Counter[bytes]:
    tags: collections.Counter[bytes] = collections.Counter()
    for _ in range(count):
        tags[(await tcp_exchange(address)).split(b":")[0]] += 1
    return tags


async def test_connections_stay_in_this_nodes_zone_and_follow_a_new_zone(
    tmp_path: Path, backends: Backends,
) -> None:
    ports = {tag: await backends.tcp(tag) for tag in ("a1", "a2", "b1")}
    services = tmp_path / "services.yaml"
    write(services, objects("zone-a", ports))
    async with running_uproxy(services, *LAPTOP) as up:
        web = up.address("default/web", "http")
        assert await tags_of(web) == {b"a1": 3, b"a2": 3}
        assert "(2 endpoints)" in up.tables[-1]

        write(services, objects("zone-b", ports))  # this node moved (relabelled)
        await up.reload()
        assert await tags_of(web) == {b"b1": 6}

        write(services, objects("zone-a", ports, node_hint=True))  # PreferSameNode
        await up.reload()
        assert await tags_of(web) == {b"a2": 6}

        write(services, objects("zone-c", ports))  # no endpoint for this zone: all serve
        await up.reload()
        assert await tags_of(web) == {b"a1": 2, b"a2": 2, b"b1": 2}
