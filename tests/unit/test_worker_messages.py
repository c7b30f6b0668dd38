"""--workers' wire: typed messages and their frames, sans-io."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uproxy.model import Endpoint, ServicePortName
from uproxy.workers.channel import HEADER, BadFrame, Frame, FrameDecoder, StreamBroken, frame
from uproxy.workers.messages import (
    NUMBERS,
    Abort,
    Close,
    Forget,
    Message,
    MessageError,
    Open,
    PortReport,
    PortUpdate,
    Stats,
    Stop,
    WorkerConfig,
    decode,
    encode,
)

WEB = ServicePortName("default", "web", "http", "TCP")
A, B = Endpoint("10.0.0.1", 8080, "shop/web-1"), Endpoint("fd00::2", 8080)

MESSAGES: list[Message] = [
    PortUpdate(WEB, (A, B), 10800.0),
    PortUpdate(WEB, (A,), None, external=(A,), cluster_ips=("198.18.0.10",)),
    PortUpdate(WEB, (), None, external=(), cluster_ips=("198.18.0.10",)),
    Forget(WEB), Open(7, WEB, "UDP"), Close(7), Abort(7), Stop(2.5),
    Stats({7: PortReport(tuple(float(i) for i in range(len(NUMBERS))), {"10.0.0.1:8080": 3},
                         (0.001, 0.25))}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_its_encoding(message: Message) -> None:
    assert decode(encode(message)) == message


@pytest.mark.parametrize(("body", "says"), [
    (b"not json", "a bad message"), (b"[1, 2]", "a bad message"), (b'{"op": "dance"}', "dance"),
    (b'{"op": "open", "id": "x"}', "a bad message"),
])
def test_what_is_not_a_message_is_one_line(body: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says) as raised:
        decode(body)
    assert "\n" not in str(raised.value)


def test_the_worker_config_travels_as_json() -> None:
    config = WorkerConfig(relay_mode="splice", udp_timeout=5.0, verbose=1, grace=3.0)
    assert WorkerConfig.from_json(config.to_json()) == config
    with pytest.raises(MessageError, match="worker config"):
        WorkerConfig.from_json('{"relay_mode": "auto"}')


@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_frames_come_out_whole_however_the_bytes_are_cut(cuts: list[int]) -> None:
    stream = b"".join(frame(message, 1 if isinstance(message, Open) else 0)
                      for message in MESSAGES)
    decoder = FrameDecoder()
    out: list[Frame | BadFrame] = []
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    fds_given = False
    for start, end in itertools.pairwise(points):
        fds = [99] if not fds_given and end > 0 else []
        fds_given = fds_given or bool(fds)
        out += decoder.feed(stream[start:end], fds)
    assert [item.message for item in out if isinstance(item, Frame)] == MESSAGES
    (opened,) = [item for item in out if isinstance(item.message, Open)]  # type: ignore[union-attr]
    assert opened.fds == [99]  # the descriptor goes with the frame that asked for it


def test_a_bad_frame_is_an_error_value_and_the_next_frame_still_decodes() -> None:
    decoder = FrameDecoder()
    junk = b"{not json"
    items = decoder.feed(HEADER.pack(len(junk), 1) + junk + frame(Close(3)), [42])
    assert isinstance(items[0], BadFrame) and items[0].fds == [42]
    assert items[1] == Frame(Close(3), [])


def test_a_header_no_frame_can_have_breaks_the_stream() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(StreamBroken, match="a frame of 4096 bytes"):
        decoder.feed(HEADER.pack(4096, 0))
