"""Server-backed stores for tests: a fresh database or key namespace per test, and the rule
that a missing server skips a test locally but fails it in CI."""

from __future__ import annotations

import os

import pytest

from farmhand.testing.servers import LocalPostgres, LocalRedis


def server_missing(what: str, why: object) -> None:
    """Skip a test whose server is missing here; in CI (CI=true) that is a failure."""
    message = f"{what} is not available: {why}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: server-backed tests must run)", pytrace=False)
    pytest.skip(message)


def fresh_postgres_url(server: LocalPostgres | str) -> str:
    """A new, empty database on ``server`` for one test."""
    import psycopg

    from farmhand.ids import new_id

    admin = server if isinstance(server, str) else server.url
    name = new_id("t").lower()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    return f"{base}/{name}"


def fresh_redis_url(server: LocalRedis | str) -> str:
    """A URL on ``server`` with a key namespace of its own, for one test."""
    from farmhand.ids import new_id

    base = server if isinstance(server, str) else server.url
    return f"{base}?namespace={new_id('t')}"
