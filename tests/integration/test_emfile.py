"""Running out of file descriptors slows accepting down; it never kills the listener.

A child process runs a TcpServer with RLIMIT_NOFILE lowered to 64; the test
opens connections until the child cannot take more, checks that it paused
(and logged it), then closes them and checks that new connections are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.relay_helpers import backend, echo

CHILD = Path(__file__).with_name("relay_emfile_child.py")
NOFILE = 64
CONNECTIONS = 60  # served ones take 2 descriptors each in the child: more than fit


async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> bool:
    writer.write(b"p")
    try:
        return await asyncio.wait_for(reader.readexactly(1), timeout) == b"p"
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        return False


async def test_out_of_descriptors_pauses_accepting_then_recovers(tmp_path: Path) -> None:
    server, endpoint = await backend(echo)
    stderr_path = tmp_path / "child.stderr"
    with stderr_path.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(endpoint.port), str(NOFILE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            cwd=Path(__file__).parents[2],
        )
    assert child.stdout is not None and child.stdin is not None
    try:
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, child.stdout.readline), 10)
        port = int(line)

        connections = []
        for _ in range(CONNECTIONS):
            # A client whose dial found no descriptor is reset, maybe while connecting.
            with contextlib.suppress(ConnectionError):
                connections.append(await asyncio.open_connection("127.0.0.1", port))
        results = await asyncio.gather(*(served(r, w, 1.5) for r, w in connections))
        assert 10 < sum(results) < CONNECTIONS, results

        deadline = time.monotonic() + 5
        while b"accept paused" not in stderr_path.read_bytes() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b"accept paused" in stderr_path.read_bytes()
        assert child.poll() is None

        for _, writer in connections:
            writer.close()
        recovered = False
        deadline = time.monotonic() + 10
        while not recovered and time.monotonic() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            recovered = await served(reader, writer, 2.0)
            writer.close()
        assert recovered, "no connection was served after descriptors were freed"
        assert child.poll() is None

        child.stdin.close()
        tail = await asyncio.wait_for(loop.run_in_executor(None, child.stdout.read), 10)
        assert child.wait(10) == 0
        counters = json.loads(tail)
        assert counters["accept_backoffs"] >= 1
        assert counters["connections_accepted"] > sum(results)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        with contextlib.suppress(OSError):
            child.stdout.close()
        server.close()
