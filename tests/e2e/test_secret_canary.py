"""The secret canary: credentials reach the wire and nowhere else.

Two recognisable secret values (``CANARY-<random hex>``) are planted for two accounts, one
in an executor's environment, one in the 0600 secrets file. Real executor processes run
webhook intents that succeed, retry, fail permanently and fail at a provider that echoes
the Authorization header (raw, base64 and URL-encoded) into its 500 answer. Then every
text in every row of every table of the store, the store's files, every log line the
executors wrote and every ``--json`` output of the CLI is searched: no canary, in any
form. The sink must have seen ``Authorization: Bearer <canary>``, so the search cannot
pass because nothing was sent.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from e2e_support import SETTLED, ArrivalSink, Executors, Farmhand, connect, poll, write_config

ENV_SECRET = "CANARY_ENV"  # FARMHAND_SECRET_CANARY_ENV
FILE_SECRET = "canary-file"  # a name the environment could not spell as-is
ABSENT_SECRET = "NOT_ON_THIS_HOST"

CONFIG = f"""
[executor]
lease_ttl = 10
grace = 5

[executor.retry]
base_delay = 0.05
max_delay = 0.2

[agents.local]
kinds = ["*"]
accounts = ["*"]

[accounts.env-acct]
secret = "{ENV_SECRET}"

[accounts.file-acct]
secret = "{FILE_SECRET}"

[accounts.absent-acct]
secret = "{ABSENT_SECRET}"
"""


def canary() -> str:
    return f"CANARY-{secrets.token_hex(12)}"


def leaked_forms(value: str) -> set[str]:
    """Every form of ``value`` the search looks for."""
    raw = value.encode("utf-8")
    found = {value, quote(value, safe=""), quote_plus(value)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(raw).decode("ascii")
        found |= {text, text.rstrip("=")}
    return found


def find_leaks(text: str, values: list[str], where: str) -> list[str]:
    return [f"{where}: {form!r}" for v in values for form in leaked_forms(v) if form in text]


def store_texts(db: Path) -> Iterator[tuple[str, str]]:
    """(table.column, text) for every text or blob value of every row of every table."""
    with connect(db) as conn:
        tables = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        assert {"intents", "receipts", "audit", "attempts"} <= set(tables), tables
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # names from the schema
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        yield f"{table}.{column}", value.decode("utf-8", errors="replace")
                    elif isinstance(value, str):
                        yield f"{table}.{column}", value


def webhook(key: str, url: str, account: str, max_attempts: int = 3) -> dict[str, object]:
    return {
        "kind": "webhook.post",
        "key": key,
        "account": account,
        "payload": {"url": url, "json": {"key": key}},
        "max_attempts": max_attempts,
    }


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_secret_canaries_reach_the_provider_and_nowhere_else(
    farmhand: Farmhand, executors: Executors, sink: ArrivalSink, tmp_path: Path
) -> None:
    env_value, file_value = canary(), canary()
    canaries = [env_value, file_value]
    init = farmhand.run("init")
    assert init.returncode == 0, init.stderr
    write_config(farmhand.home, CONFIG)  # replaces the starter config: fast retries
    secrets_file = farmhand.home / "secrets.toml"
    secrets_file.write_text(f'"{FILE_SECRET}" = "{file_value}"\n', encoding="utf-8")
    secrets_file.chmod(0o600)

    # the coordinator side (this CLI) never holds the environment secret
    assert not any(k.startswith("FARMHAND_SECRET") for k in farmhand.env)
    items = []
    for account in ("env-acct", "file-acct"):
        items += [webhook(f"{account}-ok-{i}", f"{sink.url}/ok", account) for i in range(3)]
        items.append(webhook(f"{account}-flaky", f"{sink.url}/flaky?fail_times=1", account))
        items.append(webhook(f"{account}-reject", f"{sink.url}/reject", account))
        items.append(webhook(f"{account}-echo", f"{sink.url}/echo-auth", account))
    items.append(webhook("absent-acct-ok", f"{sink.url}/ok", "absent-acct"))
    submitted = farmhand.submit_batch(items)
    assert len(submitted) == len(items)

    executors.env[f"FARMHAND_SECRET_{ENV_SECRET}"] = env_value
    workers = [
        executors.start("ex-canary-1", "--concurrency", "4", "--verbose"),
        executors.start("ex-canary-2", "--concurrency", "4"),
    ]
    poll(
        "every intent to settle",
        lambda: all(i["state"] in SETTLED for i in farmhand.intents()),
        timeout=90,
        interval=0.2,
    )
    for worker in workers:
        assert worker.terminate() == 0, worker.tail()

    # -- outcomes: the secrets were used, and the echo really happened ----------------------
    states = {i["key"]: i["state"] for i in farmhand.intents()}
    for account in ("env-acct", "file-acct"):
        for i in range(3):
            assert states[f"{account}-ok-{i}"] == "succeeded"
        assert states[f"{account}-flaky"] == "succeeded"
        assert states[f"{account}-reject"] == "dead"
        assert states[f"{account}-echo"] == "dead"
    assert states["absent-acct-ok"] == "dead"

    calls = sink.calls()
    assert calls, "the sink saw no calls"
    by_account: dict[str, set[str | None]] = {"env-acct": set(), "file-acct": set()}
    for call in calls:
        account = "env-acct" if (call.key or "").startswith("env-acct") else "file-acct"
        by_account[account].add(call.authorization)
    assert by_account["env-acct"] == {f"Bearer {env_value}"}
    assert by_account["file-acct"] == {f"Bearer {file_value}"}
    assert not [c for c in calls if (c.key or "").startswith("absent-acct")]
    echoes = [c for c in calls if c.path == "/echo-auth"]
    assert len(echoes) == 6  # 3 attempts for each account, each answered with the echo
    assert all(c.status == 500 for c in echoes)

    echo = farmhand.json("status", "env-acct-echo")
    assert echo["attempts"] == 3
    assert all(f"[redacted:{ENV_SECRET}]" in r["error"] for r in echo["receipts"])
    file_echo = farmhand.json("status", "file-acct-echo")
    assert all(f"[redacted:{FILE_SECRET}]" in r["error"] for r in file_echo["receipts"])
    absent = farmhand.json("status", "absent-acct-ok")
    assert ABSENT_SECRET in absent["reason"]
    assert f"FARMHAND_SECRET_{ABSENT_SECRET}" in absent["reason"]

    # -- the search ---------------------------------------------------------------------------
    leaks: list[str] = []
    rows = 0
    for where, text in store_texts(farmhand.db):
        rows += 1
        leaks += find_leaks(text, canaries, where)
    assert rows > 100, rows
    for path in sorted(farmhand.home.glob("farmhand.db*")):
        leaks += find_leaks(path.read_bytes().decode("latin-1"), canaries, path.name)

    logged = 0
    for path in sorted(executors.logs.iterdir()):
        text = path.read_text(encoding="utf-8", errors="replace")
        logged += len(text.splitlines())
        leaks += find_leaks(text, canaries, path.name)
    assert logged > 10, "the executors logged (almost) nothing"
    verbose = (executors.logs / "ex-canary-1.1.stderr").read_text(encoding="utf-8")
    assert "DEBUG" in verbose  # the verbose executor's debug lines were searched too

    doctor_env = dict(farmhand.env, **{f"FARMHAND_SECRET_{ENV_SECRET}": env_value})
    outputs = {
        "list": farmhand.ok("list", "--limit", "1000", "--json"),
        "receipts": farmhand.ok("receipts", "--json"),
        "audit": farmhand.ok("audit", "--limit", "100000", "--json"),
        "dlq list": farmhand.ok("dlq", "list", "--json"),
        "gate status": farmhand.ok("gate", "status", "--json"),
    }
    for item in submitted:
        outputs[f"status {item['id']}"] = farmhand.ok("status", item["id"], "--json")
    for name, output in outputs.items():
        json.loads(output)
        leaks += find_leaks(output, canaries, name)
    doctor = farmhand.run("doctor", "--json", env=doctor_env)
    report = json.loads(doctor.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["secrets.file"]["status"] == "ok", checks
    # the absent account's secret is reported missing (by name), the others are present
    assert checks["secrets.present"]["status"] == "fail"
    assert ABSENT_SECRET in checks["secrets.present"]["detail"]
    assert ENV_SECRET not in checks["secrets.present"]["detail"]
    leaks += find_leaks(doctor.stdout + doctor.stderr, canaries, "doctor")

    assert not leaks, "secret canary leaked:\n" + "\n".join(leaks)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_coordinator_never_reads_secrets_and_the_executor_refuses_a_bad_file(
    farmhand: Farmhand,
) -> None:
    value = canary()
    init = farmhand.run("init")
    assert init.returncode == 0, init.stderr
    write_config(farmhand.home, CONFIG)
    secrets_file = farmhand.home / "secrets.toml"
    secrets_file.write_text(f'{FILE_SECRET} = "{value}"\nnot toml at all\n', encoding="utf-8")
    secrets_file.chmod(0o644)
    farmhand.env["FARMHAND_SECRETS_FILE"] = str(secrets_file)

    intent_id = farmhand.ok(
        "submit", "noop", "--key", "k-1", "--payload", "{}", "--account", "file-acct"
    ).strip()
    assert farmhand.json("status", intent_id)["state"] == "pending"
    assert len(farmhand.intents()) == 1
    farmhand.ok("gate", "status", "--json")
    farmhand.ok("dlq", "list", "--json")

    done = farmhand.run("executor", "run", "--drain", "--id", "ex-refuses")
    assert done.returncode == 1, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.strip()]
    assert line.startswith("farmhand: error: refusing the secrets file ")
    assert f"chmod 600 {secrets_file}" in line
    assert value not in done.stderr + done.stdout
    assert farmhand.json("status", intent_id)["state"] == "pending"  # nothing ran

    # a named file that does not exist is refused too; the coordinator still does not care
    farmhand.env["FARMHAND_SECRETS_FILE"] = str(farmhand.home / "elsewhere.toml")
    assert farmhand.json("status", intent_id)["state"] == "pending"
    done = farmhand.run("executor", "run", "--drain", "--id", "ex-refuses")
    assert done.returncode == 1
    assert "does not exist" in done.stderr

    # fixed: mode 600 and valid TOML, the executor runs and the intent succeeds
    del farmhand.env["FARMHAND_SECRETS_FILE"]
    secrets_file.write_text(f'{FILE_SECRET} = "{value}"\n', encoding="utf-8")
    secrets_file.chmod(0o600)
    done = farmhand.run("executor", "run", "--drain", "--id", "ex-works")
    assert done.returncode == 0, done.stderr
    assert value not in done.stderr + done.stdout
    assert farmhand.json("status", intent_id)["state"] == "succeeded"
    assert os.stat(secrets_file).st_mode & 0o777 == 0o600
