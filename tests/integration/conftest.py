"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.apphelpers import Backends
from tests.kubeapi import FakeKubeAPI


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    """The test Kubernetes API server on a free loopback port, bookmarks every 0.2 s."""
    server = FakeKubeAPI(bookmark_interval=0.2)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    """Tagged TCP/UDP backends on 127.0.0.1, closed after the test."""
    made = Backends()
    try:
        yield made
    finally:
        made.close()
