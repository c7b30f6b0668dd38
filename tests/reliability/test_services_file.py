"""The services file under the ways people and tools change it, with traffic
flowing: saved by rename, deleted, recreated, and a storm of SIGHUPs."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from tests.reliability.conftest import Backend, running_uproxy, wait_for, write_services


def _tagged(tag: bytes) -> Backend:
    def handle(conn: socket.socket) -> None:
        conn.sendall(tag + conn.recv(64))

    return Backend(handle)


def _ask(address: tuple[str, int], payload: bytes = b"?") -> bytes | None:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(payload)
            answer = b""
            while chunk := sock.recv(64):
                answer += chunk
            return answer
    except OSError:
        return None


def _service(name: str, port: int, backend: Backend) -> dict[str, object]:
    return {"name": name, "ports": [{"port": port}], "endpoints": [f"127.0.0.1:{backend.port}"]}


def test_rename_delete_and_recreate_keep_serving(
    tmp_path: Path, backends: list[Backend]
) -> None:
    one, two = _tagged(b"one:"), _tagged(b"two:")
    backends += [one, two]
    services = tmp_path / "services.json"
    write_services(services, [_service("a", 9100, one)])
    with running_uproxy(services) as up:
        address = up.address("default/a")
        assert _ask(address) == b"one:?"

        # Saved by rename (an editor, `kubectl get > x && mv x services.json`).
        write_services(services, [_service("a", 9100, two)])
        wait_for(lambda: _ask(address) == b"two:?", 10, "the renamed-in file to serve")

        # Deleted: an error line, and the last good state keeps serving.
        services.unlink()
        wait_for(lambda: any("cannot read" in line for line in up.stderr_lines), 10,
                 "the deletion to be reported")
        for _ in range(20):
            assert _ask(address) == b"two:?"

        # Recreated: it loads again and says so.
        write_services(services, [_service("a", 9100, one), _service("b", 9101, two)])
        wait_for(lambda: _ask(address) == b"one:?", 10, "the recreated file to serve")
        assert _ask(up.address("default/b", 2)) == b"two:?"
        wait_for(lambda: any("loads again" in line for line in up.stderr_lines), 5,
                 "the recovery to be said")


SIGNALS = 100
REQUESTS_AT_LEAST = 500


def test_a_sighup_storm_under_traffic_fails_no_request(
    tmp_path: Path, backends: list[Backend]
) -> None:
    """Every SIGHUP reloads; half of them add or remove another service, so
    listeners open and close around the one under traffic."""
    steady, other = _tagged(b"s:"), _tagged(b"o:")
    backends += [steady, other]
    services = tmp_path / "services.json"
    with_other = [_service("steady", 9200, steady), _service("other", 9201, other)]
    write_services(services, with_other)
    with running_uproxy(services, count=2) as up:
        address = up.address("default/steady", 2)
        stop = threading.Event()
        answers: list[bytes | None] = []

        def traffic() -> None:
            while not stop.is_set() and len(answers) < 100_000:
                answers.append(_ask(address, b"x"))

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            for i in range(SIGNALS):
                write_services(services, with_other if i % 2 else with_other[:1])
                os.kill(up.pid, signal.SIGHUP)
                time.sleep(0.02)
            wait_for(lambda: len(answers) >= REQUESTS_AT_LEAST, 30, "enough requests")
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        failed = [a for a in answers if a != b"s:x"]
        print(f"SIGHUP storm: {SIGNALS} signals, {len(answers)} requests, {len(failed)} failed")
        assert not failed
        assert up.process.poll() is None
