"""Fixtures for the provider integration tests: a loopback API server, a closed port, cleanup."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from loopback_api import LoopbackAPI
from provider_harness import API_KEY


@pytest.fixture
def api():
    server = LoopbackAPI(api_key=API_KEY)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: Any) -> str:
    """Run a test once through the blocking method and once through its async twin."""
    return request.param


@pytest.fixture
def closing() -> Any:
    """``closing(provider)`` registers a provider to be closed when the test ends."""
    made: list[Any] = []

    def register(p: Any) -> Any:
        made.append(p)
        return p

    yield register
    for p in made:
        p.close()


@pytest.fixture
def dead_port() -> int:
    """A local port nothing listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
