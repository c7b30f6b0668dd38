"""The port-forward channel protocol, sans-io: messages in, events out."""

from __future__ import annotations

import pytest

from uproxy.portforward.channels import (
    ChannelDecoder,
    Closed,
    Data,
    Failure,
    PortAck,
    ProtocolError,
    close_message,
    data_message,
)


def port_message(channel: int, port: int) -> bytes:
    """What the kubelet sends first on each channel."""
    return bytes((channel,)) + port.to_bytes(2, "little")


def test_a_stream_opens_with_the_port_on_both_channels_then_carries_data() -> None:
    decoder = ChannelDecoder(8080)
    assert not decoder.ready
    assert decoder.feed(port_message(0, 8080)) == [PortAck(0)]
    assert decoder.feed(port_message(1, 8080)) == [PortAck(1)]
    assert decoder.ready
    assert decoder.feed(b"\x00hello") == [Data(b"hello")]
    assert decoder.feed(b"\x00") == [Data(b"")]


def test_the_port_is_two_bytes_little_endian() -> None:
    assert port_message(0, 8080) == b"\x00\x90\x1f"
    assert ChannelDecoder(0x1F90).feed(b"\x01\x90\x1f") == [PortAck(1)]


def test_data_in_the_first_message_after_the_port_is_kept() -> None:
    decoder = ChannelDecoder(80)
    assert decoder.feed(port_message(0, 80) + b"early") == [PortAck(0), Data(b"early")]


def test_the_kubelets_error_text_is_a_failure() -> None:
    decoder = ChannelDecoder(80)
    decoder.feed(port_message(1, 80))
    text = b"error forwarding port 80 to pod web-1, uid x: connection refused"
    assert decoder.feed(b"\x01" + text) == [Failure(text.decode())]


def test_client_messages() -> None:
    assert data_message(b"abc") == b"\x00abc"
    assert close_message() == b"\xff\x00"
    assert ChannelDecoder(1).feed(close_message(0)) == [Closed(0)]


@pytest.mark.parametrize(("message", "says"), [
    (b"", "an empty message"),
    (b"\x02x", "channel 2"),
    (b"\x00\x01", "began with 1 bytes"),
    (b"\x00\x51\x00", "named port 81, not 80"),
    (b"\xff", "a close signal of 0 bytes"),
])
def test_a_bad_message_is_an_error_value_not_a_broken_decoder(message: bytes, says: str) -> None:
    decoder = ChannelDecoder(80)
    with pytest.raises(ProtocolError, match=says):
        decoder.feed(message)
    assert decoder.feed(port_message(0, 80)) == [PortAck(0)]  # and it goes on
