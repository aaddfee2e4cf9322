"""``farmhand store migrate``: applies migrations, reports the schema version, refuses a newer
schema, masks passwords; run as an operator would, in subprocesses, on a real PostgreSQL
server and a SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backends import fresh_postgres_url
from farmhand.store.postgres_setup import latest_version
from farmhand.testing.servers import LocalPostgres
from homes import prepare_home

FARMHAND = str(Path(sys.executable).with_name("farmhand"))
SECRET = "hunter2-never-printed"


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    return subprocess.run(
        [FARMHAND, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def migrate_json(home: Path, url: str) -> dict[str, Any]:
    done = run(home, "store", "migrate", "--store", url, "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return prepare_home(tmp_path / "home")


@pytest.fixture
def empty_db(postgres_server: LocalPostgres | str) -> str:
    """A database farmhand never touched, its URL carrying a password (the test server
    trusts loopback, so any password logs in)."""
    url = fresh_postgres_url(postgres_server, empty=True)
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@", 1)


def test_migrates_a_new_database_then_reports_it_current(home: Path, empty_db: str) -> None:
    latest = latest_version()
    first = migrate_json(home, empty_db)
    assert first["backend"] == "postgresql"
    assert first["migrations"] is True
    assert (first["before"], first["after"], first["latest"]) == (0, latest, latest)
    assert first["applied"] == list(range(1, latest + 1))
    assert SECRET not in first["store"]
    assert "postgres:***@" in first["store"]

    again = migrate_json(home, empty_db)
    assert (again["before"], again["after"], again["applied"]) == (latest, latest, [])

    done = run(home, "store", "migrate", "--store", empty_db)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"schema version {latest}, up to date")
    assert SECRET not in done.stdout + done.stderr

    with psycopg.connect(empty_db) as conn:
        versions = conn.execute("SELECT version FROM farmhand_migrations ORDER BY 1").fetchall()
    assert [v for (v,) in versions] == list(range(1, latest + 1))


def test_store_env_variable_is_used(home: Path, empty_db: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env.update(FARMHAND_HOME=str(home), FARMHAND_STORE=empty_db)
    done = subprocess.run(
        [FARMHAND, "store", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "(applied 1" in done.stdout


def test_refuses_a_newer_schema(home: Path, empty_db: str) -> None:
    migrate_json(home, empty_db)
    newer = latest_version() + 1
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("INSERT INTO farmhand_migrations (version) VALUES (%s)", (newer,))
    done = run(home, "store", "migrate", "--store", empty_db)
    assert done.returncode == 5
    (line,) = done.stderr.splitlines()
    assert f"has schema version {newer}, newer than this farmhand knows" in line
    assert "upgrade farmhand" in line
    # every other command refuses it as well
    listed = run(home, "list", "--store", empty_db)
    assert listed.returncode == 5
    assert "newer than this farmhand knows" in listed.stderr


def test_unreachable_server_is_one_line_naming_the_host(home: Path) -> None:
    done = run(home, "store", "migrate", "--store", f"postgresql://bob:{SECRET}@127.0.0.1:1/db")
    assert done.returncode == 5
    (line,) = done.stderr.splitlines()
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/db" in line
    assert "--store or FARMHAND_STORE" in line
    assert SECRET not in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://bob:{SECRET}@127.0.0.1/db?pool_size=lots", "pool_size must be"),
        (f"postgresql://bob:{SECRET}@127.0.0.1/db?colour=blue", 'parameter: "colour"'),
        (f"postgresql:bob:{SECRET}@127.0.0.1/db", "is not a PostgreSQL URL"),
    ],
)
def test_malformed_urls_are_invalid_input(home: Path, url: str, expected: str) -> None:
    done = run(home, "store", "migrate", "--store", url)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert expected in line
    assert SECRET not in line


def test_sqlite_reports_its_schema_version(home: Path, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/farmhand.db"
    first = migrate_json(home, url)
    assert first["backend"] == "sqlite"
    assert first["before"] == 0
    assert first["after"] == first["latest"] >= 1
    assert first["applied"] == list(range(1, first["latest"] + 1))
    again = migrate_json(home, url)
    assert again["before"] == again["after"]
    assert again["applied"] == []
