"""PROXY protocol headers: the shapes (bytes against HAProxy's are in
tests/integration/test_proxy_header.py)."""

from __future__ import annotations

import pytest

from uproxy.proxyheader import V2_SIGNATURE, proxy_header


def test_v1_is_one_text_line() -> None:
    assert proxy_header(1, ("198.18.0.7", 51234), ("198.18.1.10", 80)) == (
        b"PROXY TCP4 198.18.0.7 198.18.1.10 51234 80\r\n")
    assert proxy_header(1, ("fd00::7", 1), ("fd00::10", 443)) == (
        b"PROXY TCP6 fd00::7 fd00::10 1 443\r\n")


def test_v2_is_the_signature_then_the_address_block() -> None:
    header = proxy_header(2, ("198.18.0.7", 51234), ("198.18.1.10", 80))
    assert header[:12] == V2_SIGNATURE
    assert header[12:16] == b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 bytes
    assert header[16:] == bytes([198, 18, 0, 7, 198, 18, 1, 10]) + (51234).to_bytes(2, "big") \
        + (80).to_bytes(2, "big")
    six = proxy_header(2, ("fd00::7", 1), ("fd00::10", 443))
    assert six[12:16] == b"\x21\x21\x00\x24" and len(six) == 16 + 36


@pytest.mark.parametrize("version", [1, 2])
def test_a_mapped_ipv4_client_is_written_as_ipv4(version: int) -> None:
    """An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d."""
    assert proxy_header(version, ("::ffff:127.0.0.3", 4000), ("::ffff:127.77.0.9", 80)) == (
        proxy_header(version, ("127.0.0.3", 4000), ("127.77.0.9", 80)))


def test_mixed_families_are_both_written_as_ipv6() -> None:
    assert proxy_header(1, ("127.0.0.3", 4000), ("fd00::10", 80)) == (
        b"PROXY TCP6 ::ffff:7f00:3 fd00::10 4000 80\r\n")


def test_only_versions_1_and_2_exist() -> None:
    with pytest.raises(ValueError, match="only 1 and 2"):
        proxy_header(3, ("127.0.0.1", 1), ("127.0.0.1", 2))
