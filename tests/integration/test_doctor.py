"""``farmhand doctor``: every check's ok/warn/fail, its hint, the exit code and the JSON shape.

The CLI runs in subprocesses on a real home directory, as an operator would run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from backends import fresh_postgres_url
from farmhand import doctor
from farmhand.testing.servers import LocalPostgres

FARMHAND = str(Path(sys.executable).with_name("farmhand"))
VALUE = "CANARY-feedfacecafebeef"

POLICY = """
[agents.local]
kinds = ["*"]
accounts = ["*"]
"""


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    clean["FARMHAND_HOME"] = str(home)
    clean.update(env)
    return subprocess.run(
        [FARMHAND, *args], env=clean, capture_output=True, text=True, timeout=60, check=False
    )


def diagnose(home: Path, **env: str) -> tuple[int, dict[str, Any], dict[str, dict[str, str]]]:
    """Run ``farmhand doctor --json``: exit code, the whole report, checks by name."""
    done = run(home, "doctor", "--json", **env)
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    return done.returncode, report, {c["name"]: c for c in report["checks"]}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An initialised home: config with a policy, signing key, store."""
    path = tmp_path / "home"
    done = run(path, "init")
    assert done.returncode == 0, done.stderr
    path.chmod(0o700)
    return path


def add_config(home: Path, text: str) -> None:
    with (home / "farmhand.toml").open("a", encoding="utf-8") as handle:
        handle.write(text)


def test_a_fresh_home_is_healthy(home: Path) -> None:
    code, report, checks = diagnose(home)
    assert code == 0
    assert report["ok"] is True
    assert list(checks) == [
        "home",
        "config",
        "secrets.file",
        "secrets.present",
        "policy",
        "keys.private",
        "keys.public",
        "store",
        "clock",
    ]
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "hint"}
        assert check["status"] == "ok", check
        assert "\n" not in check["detail"] + check["hint"]
    human = run(home, "doctor")
    assert human.returncode == 0
    assert human.stdout.splitlines()[-1].startswith("ok: 0 failed")


def test_a_missing_home_fails_and_doctor_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    code, report, checks = diagnose(missing)
    assert code == 1
    assert report["ok"] is False
    assert checks["home"]["status"] == "fail"
    assert checks["home"]["hint"] == "run farmhand init"
    assert checks["store"]["status"] == "fail"
    assert not missing.exists()
    human = run(missing, "doctor")
    assert human.returncode == 1
    assert "FAIL  home" in human.stdout
    assert "-> run farmhand init" in human.stdout


def test_a_world_writable_home_fails(home: Path) -> None:
    home.chmod(0o777)
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["home"]["status"] == "fail"
    assert checks["home"]["hint"] == f"chmod o-w {home}"
    home.chmod(0o770)
    code, _, checks = diagnose(home)
    assert code == 0
    assert checks["home"]["status"] == "warn"


def test_secrets_file_mode_and_location(home: Path, tmp_path: Path) -> None:
    path = home / "secrets.toml"
    path.write_text(f'T = "{VALUE}"\n', encoding="utf-8")
    path.chmod(0o644)
    done = run(home, "doctor", "--json")
    assert done.returncode == 1
    assert VALUE not in done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["secrets.file"]["status"] == "fail"
    assert checks["secrets.file"]["hint"] == f"chmod 600 {path}"

    path.chmod(0o600)
    code, _, checks = diagnose(home)
    assert code == 0
    assert checks["secrets.file"]["status"] == "ok"
    assert "1 secrets" in checks["secrets.file"]["detail"]

    synced = tmp_path / "Dropbox"
    synced.mkdir()
    (synced / ".dropbox").mkdir()
    elsewhere = synced / "secrets.toml"
    elsewhere.write_text(f'T = "{VALUE}"\n', encoding="utf-8")
    elsewhere.chmod(0o600)
    code, _, checks = diagnose(home, FARMHAND_SECRETS_FILE=str(elsewhere))
    assert code == 1
    assert "Dropbox" in checks["secrets.file"]["detail"]

    code, _, checks = diagnose(home, FARMHAND_SECRETS_FILE=str(tmp_path / "absent.toml"))
    assert code == 1
    assert "does not exist" in checks["secrets.file"]["detail"]


def test_secrets_file_that_is_not_toml(home: Path) -> None:
    path = home / "secrets.toml"
    path.write_text(f"T = {VALUE}\n", encoding="utf-8")  # unquoted: not TOML
    path.chmod(0o600)
    done = run(home, "doctor", "--json")
    assert done.returncode == 1
    assert VALUE not in done.stdout
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert "not valid TOML" in checks["secrets.file"]["detail"]


def test_secrets_named_by_accounts_are_reported_by_name(home: Path) -> None:
    add_config(home, '\n[accounts.billing]\nsecret = "BILLING_TOKEN"\n')
    code, _, checks = diagnose(home)
    assert code == 1
    present = checks["secrets.present"]
    assert present["status"] == "fail"
    assert "BILLING_TOKEN (account billing)" in present["detail"]
    assert "FARMHAND_SECRET_BILLING_TOKEN" in present["hint"]

    done = run(home, "doctor", "--json", FARMHAND_SECRET_BILLING_TOKEN=VALUE)
    assert done.returncode == 0, done.stdout
    assert VALUE not in done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["secrets.present"]["status"] == "ok"
    assert "BILLING_TOKEN" in checks["secrets.present"]["detail"]

    # from the secrets file as well
    path = home / "secrets.toml"
    path.write_text(f'BILLING_TOKEN = "{VALUE}"\n', encoding="utf-8")
    path.chmod(0o600)
    done = run(home, "doctor", "--json")
    assert done.returncode == 0, done.stdout
    assert VALUE not in done.stdout


def test_a_config_without_agents_fails_the_policy_check(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(home, "init").returncode == 0
    (home / "farmhand.toml").write_text("[executor]\nconcurrency = 4\n", encoding="utf-8")
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["policy"]["status"] == "fail"
    assert "[agents" in checks["policy"]["hint"]
    (home / "farmhand.toml").write_text(POLICY, encoding="utf-8")
    _, _, checks = diagnose(home)
    assert checks["policy"]["status"] == "ok"


def test_a_broken_config_is_a_failed_check_not_a_crash(home: Path) -> None:
    (home / "farmhand.toml").write_text("[executor\n", encoding="utf-8")
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["config"]["status"] == "fail"
    assert checks["store"]["status"] == "ok"  # the other checks still ran


def test_signing_keys(home: Path) -> None:
    private = sorted((home / "keys" / "private").glob("*.key"))
    assert private, "farmhand init made no signing key"
    private[0].chmod(0o644)
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["keys.private"]["status"] == "fail"
    assert checks["keys.private"]["hint"] == f"chmod 600 {private[0]}"

    for key in private:
        key.unlink()
    code, _, checks = diagnose(home)
    assert code == 0  # an executor-only host has no private key
    assert checks["keys.private"]["status"] == "warn"

    for public in (home / "keys" / "public").glob("*.json"):
        public.unlink()
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["keys.public"]["status"] == "fail"


def test_a_damaged_store_fails(home: Path) -> None:
    db = home / "farmhand.db"
    for extra in (home / "farmhand.db-wal", home / "farmhand.db-shm"):
        extra.unlink(missing_ok=True)
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["store"]["status"] == "fail"


def test_an_unknown_store_scheme_fails(home: Path) -> None:
    code, _, checks = diagnose(home, FARMHAND_STORE="mysql://db/farmhand")
    assert code == 1
    assert checks["store"]["status"] == "fail"
    assert "unknown store URL scheme" in checks["store"]["detail"]


def test_a_server_store_password_never_shows(
    home: Path, postgres_server: LocalPostgres | str
) -> None:
    url = fresh_postgres_url(postgres_server)
    # the throw-away server trusts loopback, so the password is accepted and unused
    with_password = url.replace("://postgres@", "://postgres:Sup3r-s3cret@", 1)
    assert with_password != url
    done = run(home, "doctor", "--json", FARMHAND_STORE=with_password)
    assert "Sup3r-s3cret" not in done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["store"]["status"] == "ok", checks["store"]
    assert "opens and reads" in checks["store"]["detail"]


def test_doctor_does_not_write_to_the_store(home: Path) -> None:
    assert run(home, "submit", "noop", "--key", "k-1", "--payload", "{}").returncode == 0
    db = home / "farmhand.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    code, _, checks = diagnose(home)
    assert code == 0
    assert checks["store"]["status"] == "ok"
    # a read-only reader of a WAL database may create the -wal/-shm files, nothing else
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    wal = home / "farmhand.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert {p.name for p in home.glob("farmhand.db*")} <= {
        "farmhand.db",
        "farmhand.db-wal",
        "farmhand.db-shm",
    }


def test_a_store_record_in_the_future_fails_the_clock_check(home: Path) -> None:
    assert run(home, "submit", "noop", "--key", "k-1", "--payload", "{}").returncode == 0
    with sqlite3.connect(home / "farmhand.db") as db:
        db.execute("UPDATE intents SET updated_at = ?", (time.time() + 3600,))
    db.close()
    code, _, checks = diagnose(home)
    assert code == 1
    assert checks["clock"]["status"] == "fail"
    assert "in the future" in checks["clock"]["detail"]
    assert "NTP" in checks["clock"]["hint"]


def test_clock_drift_during_the_run_warns() -> None:
    assert doctor.check_clock((1000.0, 5.0), (1000.3, 5.3), None).status == "ok"
    stepped = doctor.check_clock((1000.0, 5.0), (1030.0, 5.3), 990.0)
    assert stepped.status == "warn"
    assert "+29.70s" in stepped.detail
    assert doctor.check_clock((1000.0, 5.0), (1000.3, 5.3), 1004.0).status == "ok"
    assert doctor.check_clock((1000.0, 5.0), (1000.3, 5.3), 1006.0).status == "fail"


async def test_run_takes_an_injected_clock(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([(0.0, 0.0), (100.0, 1.0)])
    monkeypatch.delenv("FARMHAND_STORE", raising=False)
    report = await doctor.run(home=home, environ={}, clock=lambda: next(samples))
    clock = {c.name: c for c in report.checks}["clock"]
    assert clock.status == "warn"
    assert report.ok
    assert report.to_json()["ok"] is True
