"""Start, reload, drain and stop: the `uproxy` command as users run it, and
the in-process app leaving nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.apphelpers import (
    Backends,
    Lines,
    running_uproxy,
    tcp_exchange,
    udp_exchange,
    write_services,
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_shutdown_leaves_no_tasks_or_sockets(tmp_path: Path, backends: Backends) -> None:
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": f"s{i}", "ports": [{"port": 8080}, ],
                               "endpoints": [f"127.0.0.1:{port}"]} for i in range(3)])
    tasks_before = len(asyncio.all_tasks())
    fds_before = _open_fds()
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16") as up:
        for name in list(up.parts.pool.listeners):
            assert await tcp_exchange(up.address(str(name.service))) == b"b:ping"
        assert _open_fds() > fds_before
    await asyncio.sleep(0.1)  # let closed transports finish their callbacks
    assert len(asyncio.all_tasks()) == tasks_before
    assert _open_fds() == fds_before
    assert up.task.done() and up.task.exception() is None


async def test_shutdown_drains_open_connections(
    tmp_path: Path, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    port = await backends.tcp("b")
    udp_port = await backends.udp("u")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]},
                              {"name": "d", "ports": [{"port": 53, "protocol": "UDP"}],
                               "endpoints": [f"127.0.0.1:{udp_port}"]}])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16",
                              "--shutdown-grace", "5s") as up:
        address = up.address("default/s")
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"one")
        assert await reader.readexactly(5) == b"b:one"
        await udp_exchange(up.address("default/d", "", "UDP"))  # a UDP session stays open
        caplog.set_level(logging.INFO, logger="uproxy")
        up.parts.stop.set()
        await asyncio.sleep(0.3)
        assert not up.task.done()  # waiting for our connection to finish
        with pytest.raises(ConnectionRefusedError):  # but no longer accepting
            await asyncio.open_connection(*address)
        writer.write(b"two")  # the open connection still works while draining
        assert await reader.readexactly(5) == b"b:two"
        writer.close()
        await asyncio.wait_for(up.task, 3)
    assert "draining 1 TCP connection and 1 UDP session for up to 5.0s" in caplog.messages


async def test_grace_period_bounds_the_drain(tmp_path: Path, backends: Backends) -> None:
    port = await backends.tcp("b")
    services = tmp_path / "services.yaml"
    write_services(services, [{"name": "s", "ports": [{"port": 8080}],
                               "endpoints": [f"127.0.0.1:{port}"]}])
    async with running_uproxy(services, "--bind-range", "127.77.0.0/16",
                              "--shutdown-grace", "300ms") as up:
        reader, writer = await asyncio.open_connection(*up.address("default/s"))
        writer.write(b"x")
        await reader.readexactly(3)
        started = time.monotonic()
        up.parts.stop.set()
        await asyncio.wait_for(up.task, 3)
        assert 0.25 < time.monotonic() - started < 2.0
        # Closed by the proxy when the grace ran out (an abortive close).
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()


def test_uproxy_command_serves_reloads_on_sighup_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    backend = subprocess.Popen(
        [sys.executable, "-c",
         "import socket,sys\n"
         "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen()\n"
         "print(s.getsockname()[1], flush=True)\n"
         "while True:\n"
         "    c,_=s.accept(); c.sendall(b'hello\\n'); c.close()\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert backend.stdout is not None
        port = int(backend.stdout.readline())
        services = tmp_path / "services.yaml"
        write_services(services, [{"name": "greet", "ports": [{"port": 2525}],
                                   "endpoints": [f"127.0.0.1:{port}"]}])
        process = subprocess.Popen(
            [sys.executable, "-m", "uproxy", "--services", str(services),
             "--bind-range", "127.77.0.0/16", "--healthz-bind-address", "",
             "--metrics-bind-address", ""],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            output = Lines(process)
            table = output.table(1)
            ip, service_port, endpoints = table["default/greet"]
            assert (service_port, endpoints) == (2525, 1)
            import socket

            with socket.create_connection((ip, 2525), timeout=5) as client:
                assert client.recv(100) == b"hello\n"  # server speaks first

            # A second service appears after SIGHUP (the poll would find it too).
            write_services(services, [
                {"name": "greet", "ports": [{"port": 2525}], "endpoints": [f"127.0.0.1:{port}"]},
                {"name": "again", "ports": [{"port": 2526}], "endpoints": [f"127.0.0.1:{port}"]},
            ])
            process.send_signal(signal.SIGHUP)
            table = output.table(2)
            ip2, _, _ = table["default/again"]
            with socket.create_connection((ip2, 2526), timeout=5) as client:
                assert client.recv(100) == b"hello\n"

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((ip, 2525), timeout=2)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    finally:
        backend.kill()
        backend.wait()


def test_bad_services_file_at_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    services = tmp_path / "services.yaml"
    services.write_text("services:\n  - name: x\n    ports: [{port: 99999}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "uproxy", "--services", str(services),
         "--bind-range", "127.77.0.0/16", "--healthz-bind-address", "",
         "--metrics-bind-address", ""],
        capture_output=True, text=True, timeout=20,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert "services.yaml" in errors[0] and "port" in errors[0]
