"""``farmhand doctor``: check a host's farmhand setup and say what to fix.

Each check reports ``ok``, ``warn`` or ``fail`` with a one-line detail and a one-line hint.
Nothing is changed: the store is opened read-only, no file is created, and secrets are
reported by name only (a value never reaches the report).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from farmhand.config import Settings
from farmhand.errors import FarmhandError

Status = Literal["ok", "warn", "fail"]
OK: Status = "ok"
WARN: Status = "warn"
FAIL: Status = "fail"

#: newest store record may be this far in the future before the clock check fails
FUTURE_TOLERANCE = 5.0
#: wall clock vs monotonic drift during the run that makes the clock check warn
DRIFT_TOLERANCE = 1.0
#: the clocks are compared over at least this many seconds
MIN_CLOCK_WINDOW = 0.2


@dataclass(frozen=True, slots=True)
class Check:
    """The result of one check."""

    name: str
    status: Status
    detail: str
    hint: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "hint": self.hint}


@dataclass(slots=True)
class Report:
    """Every check, in the order they ran."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return all(c.status != FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- checks ---------------------------------------------------------------------------------


def check_home(home: Path) -> Check:
    """The home directory exists, is a directory and is not world-writable."""
    if not home.exists():
        return Check("home", FAIL, f"{home} does not exist", "run farmhand init")
    if not home.is_dir():
        return Check("home", FAIL, f"{home} is not a directory", "set FARMHAND_HOME to a folder")
    mode = _mode(home)
    if mode & stat.S_IWOTH:
        return Check(
            "home",
            FAIL,
            f"{home} is world-writable (mode {mode:04o}): anyone can replace its config or keys",
            f"chmod o-w {home}",
        )
    if mode & stat.S_IWGRP:
        return Check(
            "home", WARN, f"{home} is group-writable (mode {mode:04o})", f"chmod g-w {home}"
        )
    return Check("home", OK, f"{home} (mode {mode:04o})")


def check_secrets_file(settings: Settings, environ: Mapping[str, str]) -> Check:
    """The secrets file, if any: mode 0600, a safe location, valid TOML of strings."""
    from farmhand import secrets

    path = secrets.file_path(settings.home, environ)
    named = bool(environ.get(secrets.FILE_ENV))
    if not path.exists():
        if named:
            return Check(
                "secrets.file",
                FAIL,
                f"{path} (named by {secrets.FILE_ENV}) does not exist",
                f"create it with mode 600 or unset {secrets.FILE_ENV}",
            )
        return Check(
            "secrets.file", OK, f"no secrets file at {path}; secrets come from the environment"
        )
    try:
        problem = secrets.mode_problem(path)
    except OSError as exc:
        return Check("secrets.file", FAIL, f"cannot stat {path}: {exc.strerror}", "check the path")
    if problem:
        return Check("secrets.file", FAIL, f"{path}: {problem}", f"chmod 600 {path}")
    where = secrets.location_problem(path, settings.home, settings.store_url)
    if where:
        return Check(
            "secrets.file",
            FAIL,
            f"{path}: {where}",
            f"move it to a local folder of its own and set {secrets.FILE_ENV}",
        )
    try:
        held = secrets.read_file(path, settings.home, settings.store_url)
    except secrets.SecretsError as exc:  # messages name keys, never values
        return Check("secrets.file", FAIL, str(exc), 'write one name = "value" per line')
    return Check("secrets.file", OK, f"{path} (mode {_mode(path):04o}, {len(held)} secrets)")


def check_secrets_present(settings: Settings, environ: Mapping[str, str]) -> Check:
    """Every secret an account names is held (environment or a usable secrets file)."""
    from farmhand import secrets

    wanted = sorted({a.secret for a in settings.accounts.values() if a.secret is not None})
    if not wanted:
        return Check("secrets.present", OK, "no account names a secret")
    try:
        held = secrets.load(settings, environ)
    except secrets.SecretsError:  # reported by secrets.file; judge the environment alone
        held = secrets.SecretStore(secrets.from_environment(environ), {})
    missing = secrets.missing(settings, held)
    if missing:
        names = ", ".join(f"{n} (account {', '.join(a)})" for n, a in sorted(missing.items()))
        first = sorted(missing)[0]
        return Check(
            "secrets.present",
            FAIL,
            f"missing on this host: {names}; executors here dead-letter those accounts' intents",
            held.where(first) + " (a coordinator-only host needs none)",
        )
    return Check("secrets.present", OK, f"all {len(wanted)} present: {', '.join(wanted)}")


def check_policy(settings: Settings) -> Check:
    """farmhand.toml declares agents (without them executors refuse to act)."""
    policy = settings.policy
    if policy is None or not policy.agents:
        return Check(
            "policy",
            FAIL,
            "farmhand.toml has no [agents]: executors refuse every intent",
            "add [agents.NAME] with kinds and accounts to farmhand.toml (farmhand init writes one)",
        )
    approvals = len(policy.approvals)
    return Check(
        "policy",
        OK,
        f"{len(policy.agents)} agents ({', '.join(sorted(policy.agents))}), "
        f"{approvals} approval rules",
    )


def _key_role(public_dir: Path, key_id: str) -> str | None:
    try:
        data = json.loads((public_dir / f"{key_id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    role = data.get("role") if isinstance(data, dict) else None
    return role if isinstance(role, str) else None


def check_private_keys(home: Path) -> Check:
    """keys/private holds a coordinator key, and every private key is mode 0600."""
    private = home / "keys" / "private"
    public = home / "keys" / "public"
    found = sorted(private.glob("*.key")) if private.is_dir() else []
    loose = [p for p in found if _mode(p) & 0o077]
    if loose:
        return Check(
            "keys.private",
            FAIL,
            "private keys readable by others: "
            + ", ".join(f"{p.name} ({_mode(p):04o})" for p in loose),
            "chmod 600 " + " ".join(str(p) for p in loose),
        )
    coordinator = [
        p.stem
        for p in found
        if _key_role(public, p.stem) == "coordinator" or p.stem.startswith("coordinator-")
    ]
    if not coordinator:
        return Check(
            "keys.private",
            WARN,
            f"no coordinator signing key in {private}",
            "a coordinator host needs one (farmhand init); an executor-only host does not",
        )
    if private.is_dir() and _mode(private) & 0o077:
        return Check(
            "keys.private",
            WARN,
            f"{private} is mode {_mode(private):04o}",
            f"chmod 700 {private}",
        )
    return Check("keys.private", OK, f"coordinator key {', '.join(coordinator)} (mode 0600)")


def check_public_keys(home: Path) -> Check:
    """keys/public holds the trusted keys executors verify intents with."""
    public = home / "keys" / "public"
    found = sorted(public.glob("*.json")) if public.is_dir() else []
    if not found:
        return Check(
            "keys.public",
            FAIL,
            f"no trusted public keys in {public}: executors refuse unsigned intents",
            "run farmhand init on the coordinator host and copy keys/public here",
        )
    return Check("keys.public", OK, f"{len(found)} trusted keys in {public}")


def _latest_migration() -> int:
    from importlib import resources

    folder = resources.files("farmhand.store.sql.sqlite")
    versions = [int(e.name[:4]) for e in folder.iterdir() if e.name.endswith(".sql")]
    return max(versions, default=0)


def _sqlite_check(path: Path) -> tuple[Check, float | None]:
    from farmhand.store.paths import unsafe_reason

    reason = unsafe_reason(path)
    if reason:
        return Check(
            "store", FAIL, f"{path}: {reason}", "move the store to a local, unsynced path"
        ), None
    if not path.exists():
        return Check("store", FAIL, f"no store at {path}", "run farmhand init"), None
    try:
        db = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        return Check("store", FAIL, f"cannot open {path}: {exc}", "check its permissions"), None
    try:
        result = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        newest: float | None = None
        if version > 0:
            newest = db.execute("SELECT max(updated_at) FROM intents").fetchone()[0]
    except sqlite3.Error as exc:
        return Check(
            "store", FAIL, f"{path} cannot be read: {exc}", "restore it from a backup"
        ), None
    finally:
        db.close()
    if result != ["ok"]:
        problems = "; ".join(str(r) for r in result[:3])
        return Check(
            "store", FAIL, f"{path} is damaged: {problems}", "restore it from a backup"
        ), None
    latest = _latest_migration()
    if version > latest:
        return Check(
            "store",
            FAIL,
            f"{path} has schema version {version}, newer than this farmhand knows ({latest})",
            "upgrade farmhand",
        ), newest
    if version < latest:
        return Check(
            "store",
            WARN,
            f"{path} has schema version {version}; this farmhand writes {latest}",
            "the next farmhand command that opens it for writing migrates it",
        ), newest
    return Check("store", OK, f"{path}: quick_check ok, schema version {version}"), newest


async def check_store(url: str) -> tuple[Check, float | None]:
    """The store opens and reads. SQLite: read-only, PRAGMA quick_check, nothing created.

    Also returns the newest ``updated_at`` in it (None when unknown), for the clock check.
    """
    from farmhand.store import open_store, sqlite_path

    scheme = url.partition(":")[0].lower() if ":" in url else ""
    try:
        if scheme == "sqlite":
            return await asyncio.to_thread(_sqlite_check, sqlite_path(url))
        opened = await open_store(url)
        try:
            await opened.gates()
        finally:
            await opened.close()
    except FarmhandError as exc:
        return Check("store", FAIL, str(exc), "check --store / FARMHAND_STORE"), None
    # the store's own spelling of its URL: a password in it is masked
    return Check("store", OK, f"{opened.url} opens and reads"), None


def check_clock(
    start: tuple[float, float], end: tuple[float, float], newest: float | None
) -> Check:
    """Wall clock vs monotonic drift over the run; the store's newest record not in the
    future. ``start``/``end``: (wall, monotonic) samples."""
    drift = (end[0] - start[0]) - (end[1] - start[1])
    if newest is not None and newest > end[0] + FUTURE_TOLERANCE:
        return Check(
            "clock",
            FAIL,
            f"the newest record in the store is {newest - end[0]:.1f}s in the future: this "
            "host's clock is behind the one that wrote it",
            "synchronise clocks (NTP/chrony); leases, retries and expiry use wall-clock time",
        )
    if abs(drift) > DRIFT_TOLERANCE:
        return Check(
            "clock",
            WARN,
            f"the wall clock moved {drift:+.2f}s against the monotonic clock during this check",
            "check time synchronisation (NTP/chrony); a stepping clock disturbs leases",
        )
    tail = "" if newest is None else f"; newest store record {end[0] - newest:.1f}s ago"
    return Check("clock", OK, f"drift {drift:+.3f}s over {end[1] - start[1]:.2f}s{tail}")


# -- the whole run --------------------------------------------------------------------------


def _settings(store: str | None, home: Path | None) -> tuple[Settings, Check]:
    from farmhand.config import CONFIG_NAME, default_home, load

    home = home or default_home()
    try:
        settings = load(store=store, home=home)
    except FarmhandError as exc:
        fallback = Settings(
            home=home,
            store_url=store
            or os.environ.get("FARMHAND_STORE")
            or f"sqlite://{(home / 'farmhand.db').absolute()}",
        )
        return fallback, Check("config", FAIL, str(exc), f"fix {home / CONFIG_NAME}")
    path = home / CONFIG_NAME
    if not path.exists():
        return settings, Check("config", WARN, f"no {path}; defaults apply", "run farmhand init")
    return settings, Check("config", OK, str(path))


async def run(
    store: str | None = None,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], tuple[float, float]] | None = None,
) -> Report:
    """Run every check. ``clock`` returns (wall, monotonic) samples (tests replace it)."""
    env = os.environ if environ is None else environ
    sample = clock or (lambda: (time.time(), time.monotonic()))
    start = sample()
    settings, config = _settings(store, home)
    report = Report()
    report.checks.append(check_home(settings.home))
    report.checks.append(config)
    report.checks.append(check_secrets_file(settings, env))
    report.checks.append(check_secrets_present(settings, env))
    report.checks.append(check_policy(settings))
    report.checks.append(check_private_keys(settings.home))
    report.checks.append(check_public_keys(settings.home))
    store_check, newest = await check_store(settings.store_url)
    report.checks.append(store_check)
    if clock is None:
        remaining = MIN_CLOCK_WINDOW - (time.monotonic() - start[1])
        if remaining > 0:
            await asyncio.sleep(remaining)
    report.checks.append(check_clock(start, sample(), newest))
    return report
