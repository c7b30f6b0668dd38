"""Timelines of a whole uproxy in laptop mode: services file in, real
connections through per-service loopback IPs out."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from pathlib import Path

import pytest

from tests.integration.apphelpers import (
    Backends,
    running_uproxy,
    tcp_exchange,
    udp_exchange,
    write_services,
)
from uproxy.model import ObjectName

LAPTOP = ("--bind-range", "127.77.0.0/16")



async def test_several_services_get_distinct_ips_and_real_ports(
    tmp_path: Path, backends: Backends
) -> None:
    a1, a2 = await backends.tcp("a1"), await backends.tcp("a2")
    b1 = await backends.tcp("b1")
    dns = await backends.udp("dns")
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": "alpha", "ports": [{"port": 8080}],
         "endpoints": [f"127.0.0.1:{a1}", f"127.0.0.1:{a2}"]},
        {"name": "beta", "namespace": "other", "ports": [{"port": 8080}],
         "endpoints": [f"127.0.0.1:{b1}"]},
        {"name": "dns", "ports": [{"port": 5353, "protocol": "UDP"}],
         "endpoints": [f"127.0.0.1:{dns}"]},
    ])
    async with running_uproxy(services, *LAPTOP) as up:
        alpha = up.address("default/alpha")
        beta = up.address("other/beta")
        assert alpha[1] == beta[1] == 8080
        assert alpha[0] != beta[0]
        assert alpha[0].startswith("127.77.") and beta[0].startswith("127.77.")

        tags = collections.Counter()
        for _ in range(6):
            reply = await tcp_exchange(alpha)
            tags[reply.split(b":")[0]] += 1
        assert tags == {b"a1": 3, b"a2": 3}  # round-robin over both endpoints
        assert await tcp_exchange(beta) == b"b1:ping"

        dns_address = up.address("default/dns", protocol="UDP")
        reply, source = await udp_exchange(dns_address)
        assert reply == b"dns:ping"
        assert source == dns_address  # the reply comes from the service IP:port

        table = up.tables[-1]
        assert f"default/alpha  8080/tcp  ->  {alpha[0]}:8080" in table
        assert "(2 endpoints)" in table and "(1 endpoint)" in table


async def test_ips_are_stable_across_restarts(tmp_path: Path, backends: Backends) -> None:
    port = await backends.tcp("x")
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": f"svc{i}", "ports": [{"port": 9000 + i}], "endpoints": [f"127.0.0.1:{port}"]}
        for i in range(5)
    ])
    async with running_uproxy(services, *LAPTOP) as up:
        first = {f"svc{i}": up.address(f"default/svc{i}") for i in range(5)}
    async with running_uproxy(services, *LAPTOP) as up:
        second = {f"svc{i}": up.address(f"default/svc{i}") for i in range(5)}
    assert first == second


async def test_change_timeline_add_port_change_port_delete_readd(
    tmp_path: Path, backends: Backends
) -> None:
    one, two = await backends.tcp("one"), await backends.tcp("two")
    services = tmp_path / "services.yaml"
    web = {"name": "web", "ports": [{"name": "http", "port": 8080, "targetPort": one}],
           "endpoints": ["127.0.0.1"]}
    write_services(services, [web])
    async with running_uproxy(services, *LAPTOP) as up:
        ip, _ = up.address("default/web", "http")
        assert await tcp_exchange((ip, 8080)) == b"one:ping"

        # Add a port to the live service: the first keeps working.
        web["ports"] = [{"name": "http", "port": 8080, "targetPort": one},
                        {"name": "admin", "port": 8081, "targetPort": two}]
        write_services(services, [web])
        await up.reload()
        assert up.address("default/web", "admin") == (ip, 8081)
        assert await tcp_exchange((ip, 8081)) == b"two:ping"
        assert await tcp_exchange((ip, 8080)) == b"one:ping"

        # Change a port number: the old one is closed, the new one serves.
        web["ports"] = [{"name": "http", "port": 8090, "targetPort": one},
                        {"name": "admin", "port": 8081, "targetPort": two}]
        write_services(services, [web])
        await up.reload()
        assert await tcp_exchange((ip, 8090)) == b"one:ping"
        with pytest.raises(ConnectionRefusedError):
            await tcp_exchange((ip, 8080))

        # Delete the service: refused. Re-add it: served again on the same IP.
        write_services(services, [])
        await up.reload()
        with pytest.raises(ConnectionRefusedError):
            await tcp_exchange((ip, 8090))
        assert "(no services)" in up.tables[-1]
        write_services(services, [web])
        await up.reload()
        assert up.address("default/web", "http") == (ip, 8090)
        assert await tcp_exchange((ip, 8090)) == b"one:ping"


async def test_endpoint_update_moves_new_connections(tmp_path: Path, backends: Backends) -> None:
    old, new = await backends.tcp("old"), await backends.tcp("new")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{old}"]}])
    async with running_uproxy(services, *LAPTOP) as up:
        address = up.address("default/s")
        assert await tcp_exchange(address) == b"old:ping"
        write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                                   "endpoints": [f"127.0.0.1:{new}"]}])
        await up.reload()
        assert await tcp_exchange(address) == b"new:ping"


async def test_no_endpoints_resets_promptly(tmp_path: Path) -> None:
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "empty", "ports": [{"port": 8080}], "endpoints": []}])
    async with running_uproxy(services, *LAPTOP) as up:
        assert "(0 endpoints)" in up.tables[-1]
        address = up.address("default/empty")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"x")
            await reader.readexactly(1)
        assert loop.time() - started < 1.0
        assert up.parts.pool.stats[next(iter(up.parts.pool.stats))].no_endpoints >= 1


async def test_bad_file_keeps_last_good_state(tmp_path: Path, backends: Backends) -> None:
    port = await backends.tcp("good")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]}])
    async with running_uproxy(services, *LAPTOP) as up:
        address = up.address("default/s")
        services.write_text("services:\n  - name: s\n    ports: [{port: nope}]\n")
        up.parts.source.reload()  # type: ignore[attr-defined]
        await up.wait_for(lambda: "file" in up.parts.tracker.errors)
        error = up.parts.tracker.errors["file"].message
        assert "services.yaml" in error and "port" in error and "\n" not in error
        assert await tcp_exchange(address) == b"good:ping"  # still serving

        services.write_text("")  # an empty file is an error too
        up.parts.source.reload()  # type: ignore[attr-defined]
        await up.wait_for(lambda: up.parts.tracker.errors["file"].count >= 2)
        assert await tcp_exchange(address) == b"good:ping"


async def test_file_change_is_picked_up_without_a_signal(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("later")
    services = tmp_path / "services.yaml"
    write_services(services, [])
    async with running_uproxy(services, *LAPTOP) as up:
        write_services(services, [{"name": "late", "ports": [{"port": 8080}],
                                   "endpoints": [f"127.0.0.1:{port}"]}])
        await up.wait_for(lambda: any(str(n.service) == "default/late"
                                      for n in up.parts.pool.listeners), timeout=5)
        assert await tcp_exchange(up.address("default/late")) == b"later:ping"


async def test_address_in_use_is_reported_and_others_keep_working(
    tmp_path: Path, backends: Backends
) -> None:
    import socket

    port = await backends.tcp("ok")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("0.0.0.0", 8443))  # any 127.77.x.y:8443 now conflicts
    squatter.listen()
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": "blocked", "ports": [{"port": 8443}], "endpoints": [f"127.0.0.1:{port}"]},
        {"name": "fine", "ports": [{"port": 8080}], "endpoints": [f"127.0.0.1:{port}"]},
    ])
    try:
        async with running_uproxy(services, *LAPTOP) as up:
            assert await tcp_exchange(up.address("default/fine")) == b"ok:ping"
            errors = list(up.parts.pool.errors.values())
            assert len(errors) == 1 and "address already in use" in errors[0].lower()
            assert "default/blocked" in up.tables[-1] and "not served" in up.tables[-1]
    finally:
        squatter.close()


async def test_range_exhaustion_is_reported_per_service(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("ok")
    services = tmp_path / "services.yaml"
    write_services(services, [
        {"name": f"s{i}", "ports": [{"port": 8080}], "endpoints": [f"127.0.0.1:{port}"]}
        for i in range(3)
    ])
    async with running_uproxy(services, "--bind-range", "127.78.0.0/31") as up:
        assert len(up.parts.pool.listeners) == 2
        (error,) = up.parts.pool.errors.values()
        assert "--bind-range 127.78.0.0/31" in error
        for name in up.parts.pool.listeners:
            assert await tcp_exchange(up.address(str(name.service))) == b"ok:ping"


async def test_multi_port_service_with_udp_and_tcp(tmp_path: Path, backends: Backends) -> None:
    tcp = await backends.tcp("tcp")
    udp = await backends.udp("udp")
    services = tmp_path / "services.yaml"
    write_services(services, [{
        "name": "dns",
        "ports": [{"name": "dns-tcp", "port": 5300, "targetPort": tcp, "protocol": "TCP"},
                  {"name": "dns-udp", "port": 5300, "targetPort": udp, "protocol": "UDP"}],
        "endpoints": ["127.0.0.1"],
    }])
    async with running_uproxy(services, *LAPTOP) as up:
        tcp_address = up.address("default/dns", "dns-tcp", "TCP")
        udp_address = up.address("default/dns", "dns-udp", "UDP")
        assert tcp_address == udp_address
        assert await tcp_exchange(tcp_address) == b"tcp:ping"
        assert (await udp_exchange(udp_address))[0] == b"udp:ping"


async def test_hosts_file_names_each_service(tmp_path: Path, backends: Backends) -> None:
    port = await backends.tcp("h")
    services = tmp_path / "services.yaml"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    write_services(services, [{"name": "web", "namespace": "shop", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]}])
    async with running_uproxy(services, *LAPTOP, "--hosts-file", str(hosts)) as up:
        ip, _ = up.address("shop/web")
        text = hosts.read_text()
        assert "127.0.0.1 localhost" in text  # other lines are kept
        line = next(line for line in text.splitlines() if line.startswith(ip))
        assert set(line.split()[1:]) >= {"web.shop", "web.shop.svc", "web.shop.svc.cluster.local"}

        write_services(services, [])
        await up.reload()
        assert ip not in hosts.read_text()


async def test_the_periodic_pass_keeps_an_equal_plan_and_heals_a_wrong_one(
    tmp_path: Path, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic pass plans from scratch (off the loop) as a check on the
    incremental plan: equal, the incremental objects stay; different, the
    difference is logged and the scratch plan serves."""
    port = await backends.tcp("a")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": n, "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]} for n in ("one", "two")])
    async with running_uproxy(services, *LAPTOP) as up:
        proxier = up.parts.proxier
        kept = proxier.desired
        assert (await proxier.sync()).empty  # no changes: the periodic pass
        assert proxier.desired is kept

        # A wrong incremental state (a port lost from the plan)...
        assert proxier._state is not None
        wrong = {name: p for name, p in kept.items() if str(name) != "default/two"}
        proxier._state = dataclasses.replace(proxier._state, ports=wrong)
        assert (await proxier.sync()).empty  # the listener was right all along
        # ...is found, said, and replaced by the plan from scratch.
        assert "periodic pass: 1 ports differed from the incremental plan" in caplog.text
        assert "default/two" in caplog.text
        assert proxier.desired == kept and proxier.desired is not kept
        assert await tcp_exchange(up.address("default/two")) == b"a:ping"


async def test_service_proxy_name_applies_to_the_services_file(
    tmp_path: Path, backends: Backends
) -> None:
    port = await backends.tcp("b")
    documents = []
    for name, label in (("plain", None), ("mine", "uproxy")):
        labels = {"service.kubernetes.io/service-proxy-name": label} if label else {}
        documents.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, "
            f"labels: {labels}}}\nspec: {{clusterIP: 198.18.0.{len(documents) + 1}, "
            "ports: [{port: 80, targetPort: 80}]}\n---\n"
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n"
            f"metadata: {{name: {name}-x, namespace: default, labels: "
            f"{{kubernetes.io/service-name: {name}}}}}\n"
            f"endpoints: [{{addresses: [127.0.0.1]}}]\nports: [{{port: {port}}}]\n")
    services = tmp_path / "services.yaml"
    services.write_text("---\n".join(documents))
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16",
                              "--service-proxy-name", "uproxy") as up:
        assert {str(name.service) for name in up.parts.pool.listeners} == {"default/mine"}
        assert await tcp_exchange(up.address("default/mine")) == b"b:ping"
        assert up.parts.proxier.skipped == {
            ObjectName("default", "plain"):
                "not labelled service.kubernetes.io/service-proxy-name=uproxy"}
