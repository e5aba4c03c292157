"""Shared fixtures. Keep additions small: several test packages use this file."""

from __future__ import annotations

from collections.abc import Iterator

import pg_server
import pytest


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg_server.PostgresServer]:
    """One PostgreSQL + pgvector server for the whole session (see tests/pg_server.py).

    Skips when none can be had, except when $CI is set: then it fails.
    """
    with pg_server.session_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: pg_server.PostgresServer) -> str:
    return postgres_server.url


@pytest.fixture
def pg_schema(postgres_server: pg_server.PostgresServer) -> str:
    """A fresh schema name for one test's tables (dropped when the session ends)."""
    return postgres_server.new_schema_name()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the server however it was started (a fixture, or a contract-suite factory)."""
    pg_server.shutdown()
