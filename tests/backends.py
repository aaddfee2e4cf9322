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


def fresh_postgres_url(server: LocalPostgres | str, *, empty: bool = False) -> str:
    """A new database on ``server`` for one test, already migrated: a copy of a template
    database that holds this farmhand's schema (made once per server and schema).
    ``empty``: a database farmhand has never touched."""
    import psycopg

    from farmhand.ids import new_id

    admin = server if isinstance(server, str) else server.url
    template = "" if empty else f' TEMPLATE "{_postgres_template(admin)}"'
    name = new_id("t").lower()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{template}')
    return _database_url(admin, name)


_TEMPLATES: dict[str, str] = {}


def _database_url(admin: str, name: str) -> str:
    base, _, rest = admin.rpartition("/")
    query = rest.partition("?")[2]
    return f"{base}/{name}" + (f"?{query}" if query else "")


def _postgres_template(admin: str) -> str:
    """The name of a database migrated by this farmhand's own migration code.

    Named after a hash of the migration scripts, so a changed schema gets a new template
    (on a long-lived server too). It is built under a temporary name and renamed when
    complete, so a concurrent test run never copies a half-built one; afterwards it takes
    no connections (a connected template cannot be copied).
    """
    if admin in _TEMPLATES:
        return _TEMPLATES[admin]
    import asyncio
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import psycopg

    from farmhand.ids import new_id
    from farmhand.store.postgres_setup import connect, migrate, migrations, parse_url

    scripts = "".join(script for _, script in migrations())
    name = "farmhand_template_" + hashlib.sha256(scripts.encode()).hexdigest()[:16]
    with psycopg.connect(admin, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            building = f"{name}_{new_id('b')[-8:].lower()}"
            conn.execute(f'CREATE DATABASE "{building}"')

            async def build() -> None:
                target = parse_url(_database_url(admin, building))
                db = await connect(target)
                try:
                    await migrate(db, target)
                finally:
                    await db.close()

            # (a test's event loop may be running in this thread)
            with ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, build()).result()
            conn.execute(f'ALTER DATABASE "{building}" ALLOW_CONNECTIONS false')
            try:
                conn.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
            except psycopg.errors.DuplicateDatabase:
                conn.execute(f'DROP DATABASE "{building}"')  # another run finished first
    _TEMPLATES[admin] = name
    return name


def fresh_redis_url(server: LocalRedis | str) -> str:
    """A URL on ``server`` with a key namespace of its own, for one test."""
    from farmhand.ids import new_id

    base = server if isinstance(server, str) else server.url
    return f"{base}?namespace={new_id('t')}"
