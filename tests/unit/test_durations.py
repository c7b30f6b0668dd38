"""Parsing of durations, port ranges and bind addresses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uproxy.durations import (
    PortRange,
    parse_duration,
    parse_host_port,
    parse_port_range,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("3h", 10800), ("1m30s", 90), ("1.5s", 1.5),
     ("0s", 0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [("30", "needs a unit"), ("", "empty duration"), ("5 minutes", "not a duration"),
     ("-1s", "not a duration"), ("1d", "not a duration")],
)
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_every_written_duration_parses(count: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{count}{unit}") == pytest.approx(count * factor)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30000", PortRange(30000, 30000)), ("30000-30010", PortRange(30000, 30010)),
     ("30000+10", PortRange(30000, 30010)), ("1-65535", PortRange(1, 65535))],
)
def test_port_ranges(text: str, expected: PortRange) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("0-0", "empty port range"), ("10-5", "below first port"), ("70000", "outside 1-65535"),
     ("65535+1", "past port 65535"), ("a-b", "not a number"), ("1+x", "not a number")],
)
def test_bad_port_ranges(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_port_range(text)


@given(st.integers(1, 65535), st.integers(0, 1000))
def test_plus_and_dash_agree(first: int, extra: int) -> None:
    if first + extra <= 65535:
        assert parse_port_range(f"{first}+{extra}") == parse_port_range(f"{first}-{first + extra}")
        assert parse_port_range(f"{first}+{extra}").size == extra + 1


def test_host_ports() -> None:
    assert parse_host_port("0.0.0.0:10256") == ("0.0.0.0", 10256)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    assert parse_host_port(":9000") == ("0.0.0.0", 9000)
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parse_host_port("10256")
    with pytest.raises(ValueError, match="not an IP address"):
        parse_host_port("example:80")
