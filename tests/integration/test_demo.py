"""`uproxy demo`, the README's first command, serves what it prints."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request

from tests.integration.apphelpers import Lines
from tests.unit.test_tutorial import checked_blocks


def test_demo_serves_its_services_and_stops_cleanly() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "uproxy", "demo", "--healthz-bind-address", "",
         "--metrics-bind-address", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        output = Lines(process)
        table = output.table(3)
        assert set(table) == {"demo/web", "demo/echo", "demo/dns"}, output.lines

        web_ip, web_port, web_endpoints = table["demo/web"]
        assert web_endpoints == 2
        bodies = {urllib.request.urlopen(f"http://{web_ip}:{web_port}/", timeout=5).read()
                  for _ in range(4)}
        assert bodies == {b"hello from web-1\n", b"hello from web-2\n"}

        echo_ip, echo_port, _ = table["demo/echo"]
        with socket.create_connection((echo_ip, echo_port), timeout=5) as client:
            client.sendall(b"hi\n")
            assert client.recv(100) == b"hi\n"

        dns_ip, dns_port, _ = table["demo/dns"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"question", (dns_ip, dns_port))
            reply, source = client.recvfrom(100)
            assert (reply, source) == (b"question", (dns_ip, dns_port))

        assert any("curl http://" in line for line in output.lines)
        # docs/tutorial.md quotes this table: the addresses are a hash of the names.
        printed = {line.rstrip("\n") for line in output.lines}
        for _, quoted in checked_blocks("uproxy demo"):
            assert set(quoted) <= printed, (quoted, output.lines)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
