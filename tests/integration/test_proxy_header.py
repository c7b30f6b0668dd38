"""The PROXY protocol header, byte for byte against an independent
implementation: HAProxy's `send-proxy` and `send-proxy-v2` (Debian's
haproxy), for IPv4 and IPv6. (An IPv4 client of a dual-stack listener,
::ffff:a.b.c.d, is written as IPv4 by uproxy, where HAProxy writes TCP6 with
the mapped address: see the unit test of the mapping.)"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_system
from uproxy.proxyheader import proxy_header


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Capture:
    """An endpoint that keeps the first bytes of each connection."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.got: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while not data.endswith(b"hello"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                if data.endswith(b"hello"):  # not the start-up probes
                    self.got.append(data.removesuffix(b"hello"))


@pytest.fixture
def haproxy() -> Iterator[tuple[dict[str, tuple[str, int]], dict[str, Capture]]]:
    """HAProxy frontends v1/v2 over IPv4, IPv6 and dual-stack, each to a capture."""
    require_system("haproxy")
    captures = {"v4": Capture("127.0.0.1"), "v6": Capture("::1")}
    fronts = {"v1-4": ("127.0.0.1", free_port("127.0.0.1")),
              "v2-4": ("127.0.0.1", free_port("127.0.0.1")),
              "v1-6": ("::1", free_port("::1")), "v2-6": ("::1", free_port("::1"))}
    lines = ["defaults", "  mode tcp", "  timeout connect 2s", "  timeout client 5s",
             "  timeout server 5s"]
    for name, (host, port) in fronts.items():
        version = "send-proxy-v2" if name.startswith("v2") else "send-proxy"
        capture = captures["v6" if name.endswith("-6") else "v4"]
        target = f"[{'::1' if capture is captures['v6'] else '127.0.0.1'}]:{capture.port}"
        bind = f"[{host}]:{port}"
        lines += [f"frontend f-{name}", f"  bind {bind}", f"  default_backend b-{name}",
                  f"backend b-{name}", f"  server s {target} {version}"]
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            for host, port in fronts.values():
                while True:
                    try:
                        family = socket.AF_INET6 if ":" in host else socket.AF_INET
                        with socket.socket(family) as probe:
                            probe.connect((host, port))
                        break
                    except OSError:
                        assert time.monotonic() < deadline, "haproxy did not start"
                        time.sleep(0.05)
            yield fronts, captures
        finally:
            process.terminate()
            process.wait(10)
            for capture in captures.values():
                capture.sock.close()


@pytest.mark.parametrize(("front", "client", "version"), [
    ("v1-4", "127.0.0.2", 1), ("v2-4", "127.0.0.2", 2),
    ("v1-6", "::1", 1), ("v2-6", "::1", 2),
])
def test_our_header_is_haproxys_byte_for_byte(
    haproxy: tuple[dict[str, tuple[str, int]], dict[str, Capture]], front: str, client: str,
    version: int,
) -> None:
    fronts, captures = haproxy
    host, port = fronts[front]
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((client, 0))
        sock.connect((host, port))
        source = sock.getsockname()[:2]
        sock.sendall(b"hello")
        capture = captures["v6" if front.endswith("-6") else "v4"]
        deadline = time.monotonic() + 5
        while not capture.got and time.monotonic() < deadline:
            time.sleep(0.02)
    (theirs,) = capture.got
    assert proxy_header(version, source, (host, port)) == theirs
