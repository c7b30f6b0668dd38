"""The port-forward channel protocol, sans-io: WebSocket messages in, events out.

As the kubelet speaks it (`v4.channel.k8s.io`, `v5.channel.k8s.io`), one port
per WebSocket: every binary message starts with a channel byte, 0 for data
and 1 for errors. The first message the server sends on each channel is the
port, two bytes little-endian; after that, data messages carry the pod's
bytes and an error message carries the kubelet's text (e.g. "error
forwarding port 8080 to pod web-1, uid ...: connection refused"). The client
sends data messages, and with v5 a close signal `[255, channel]` when it has
nothing more to send (a half-close). v4 has no way to say that.

A bad message is a `ProtocolError`, not a broken decoder: the caller decides
what to do with the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA = 0
ERROR = 1
CLOSE = 255  # v5: [CLOSE, channel] closes one direction of a channel
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
PROTOCOLS = (V5, V4)  # in the order we prefer them


class ProtocolError(Exception):
    """A message the protocol does not allow; the text says which and why."""


@dataclass(frozen=True, slots=True)
class PortAck:
    """The server named the port on a channel (its first message there)."""

    channel: int


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes from the pod."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Failure:
    """The kubelet's error text: the forward to the pod failed or ended badly."""

    text: str


@dataclass(frozen=True, slots=True)
class Closed:
    """v5: the server closed a channel."""

    channel: int


Event = PortAck | Data | Failure | Closed


def data_message(payload: bytes) -> bytes:
    return bytes((DATA,)) + payload


def close_message(channel: int = DATA) -> bytes:
    return bytes((CLOSE, channel))


class ChannelDecoder:
    """Turns the server's messages on one port-forward WebSocket into events."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._acked = {DATA: False, ERROR: False}

    @property
    def ready(self) -> bool:
        """Both channels have named the port: the stream is open."""
        return all(self._acked.values())

    def feed(self, message: bytes) -> list[Event]:
        if not message:
            raise ProtocolError("an empty message (no channel byte)")
        channel, payload = message[0], message[1:]
        if channel == CLOSE:
            if len(payload) != 1:
                raise ProtocolError(f"a close signal of {len(payload)} bytes (expected 1)")
            return [Closed(payload[0])]
        if channel not in self._acked:
            raise ProtocolError(f"a message on channel {channel} (only 0 and 1 exist)")
        events: list[Event] = []
        if not self._acked[channel]:
            if len(payload) < 2:
                raise ProtocolError(f"channel {channel} began with {len(payload)} bytes, "
                                    "not the 2-byte port")
            port = int.from_bytes(payload[:2], "little")
            if port != self.port:
                raise ProtocolError(f"channel {channel} named port {port}, not {self.port}")
            self._acked[channel] = True
            events.append(PortAck(channel))
            payload = payload[2:]
            if not payload:
                return events
        if channel == DATA:
            events.append(Data(payload))
        else:
            events.append(Failure(payload.decode("utf-8", errors="replace").strip()))
        return events
