"""What every listener's server is: the TCP and UDP servers of this process
(`relay.tcp.TcpServer`, `relay.udp.UdpServer`) and, with --workers, the
stand-in for a listener the workers serve (`workers.supervisor.SharedServer`).
The listener pool and a worker hold them as this, nothing more."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Server(Protocol):
    protocol: str  # TCP | UDP

    def start(self) -> None:
        """Serve (from the running loop)."""

    def stop_accepting(self) -> None:
        """No new connections or sessions; open ones go on."""

    async def drain(self, timeout: float) -> None:
        """Wait until nothing is open, at most `timeout` seconds."""

    def abort(self) -> None:
        """Close everything now (connections reset)."""

    @property
    def open_connections(self) -> int:
        """TCP connections, or UDP sessions, open now."""
