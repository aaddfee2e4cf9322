"""``command.run``: allow-listed commands run as real processes through a real executor.

Commands are Python scripts run by this interpreter (an absolute binary, as the allow-list
requires), on a real SQLite store. What must never run is proved by a file it would create.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, RetryConfig, Settings, load
from farmhand.connectors.base import Call, Failed, Succeeded, Uncertain
from farmhand.connectors.command import CommandConnector, CommandSettings
from farmhand.contracts import Intent, IntentState, IntentStatus, Outcome, ReceiptSource
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidInput
from farmhand.executor import Executor
from farmhand.keys import Keyring
from farmhand.secrets import Secret, SecretStore
from farmhand.store import Store
from homes import prepare_home

PYTHON = sys.executable
FARMHAND = str(Path(PYTHON).with_name("farmhand"))
TOKEN = "deploy-token-6f1c2b9a"

DEPLOY = """\
import os, sys
print("deploying", sys.argv[0], "to", sys.argv[1])
print("cwd=" + os.getcwd())
print("token=" + os.environ.get("DEPLOY_TOKEN", "<unset>"))
print("home=" + os.environ.get("HOME", "<unset>"))
print("path=" + os.environ["PATH"])
print("region=" + os.environ.get("REGION", "<unset>"))
print("a warning", file=sys.stderr)
"""

#: would leave proof that it ran
EVIL = """\
import pathlib, sys
pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "{marker}").write_text("ran")
"""

#: starts a child in its own process group, records both pids, then hangs
HANG = """\
import os, pathlib, signal, subprocess, sys, time
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
pathlib.Path(sys.argv[1]).write_text(f"{os.getpid()} {child.pid}")
print("started", flush=True)
time.sleep(60)
"""

FAIL = """\
import sys
print("cannot reach the cluster", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""

#: exits at once but leaves a child holding its stdout
DETACH = """\
import pathlib, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
print("detached")
"""


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """Job scripts under jobs/, a script outside it, a working directory, a marker path."""
    paths = {
        "jobs": tmp_path / "srv" / "jobs",
        "elsewhere": tmp_path / "elsewhere",
        "work": tmp_path / "srv" / "work",
        "marker": tmp_path / "evil-ran",
        "pids": tmp_path / "pids",
    }
    for name in ("jobs", "elsewhere", "work"):
        paths[name].mkdir(parents=True)
    (paths["jobs"] / "web.py").write_text(DEPLOY)
    (paths["elsewhere"] / "evil.py").write_text(EVIL.format(marker=paths["marker"]))
    (paths["jobs"] / "sneaky.py").symlink_to(paths["elsewhere"] / "evil.py")
    (paths["jobs"] / "hang.py").write_text(HANG)
    (paths["jobs"] / "fail.py").write_text(FAIL)
    (paths["jobs"] / "detach.py").write_text(DETACH)
    return paths


def config(paths: dict[str, Path]) -> str:
    jobs, pids = paths["jobs"], paths["pids"]
    return f"""
[accounts.deploy]
kinds = ["command.run"]
secret = "DEPLOY_TOKEN"

[accounts.deploy.connector]
working_dir = "{paths["work"]}"
secret_env = "DEPLOY_TOKEN"
kill_grace = 0.5
env = {{ REGION = "eu-1" }}

[[accounts.deploy.connector.commands]]
name = "deploy"
path = "{PYTHON}"
args = ["-I", {{ path_under = "{jobs}" }}, {{ one_of = ["staging", "prod"] }}]

[[accounts.deploy.connector.commands]]
name = "hang"
path = "{PYTHON}"
args = ["-I", "{jobs}/hang.py", "{pids}"]
timeout = 0.5

[[accounts.deploy.connector.commands]]
name = "hang-stubborn"
path = "{PYTHON}"
args = ["-I", "{jobs}/hang.py", "{pids}", "--ignore-term"]
timeout = 0.5

[[accounts.deploy.connector.commands]]
name = "hang-idempotent"
path = "{PYTHON}"
args = ["-I", "{jobs}/hang.py", "{pids}"]
timeout = 0.5
idempotent = true

[[accounts.deploy.connector.commands]]
name = "fail"
path = "{PYTHON}"
args = ["-I", "{jobs}/fail.py", {{ regex = "[0-9]+" }}]
retryable_exit_codes = [75]

[[accounts.deploy.connector.commands]]
name = "detach"
path = "{PYTHON}"
args = ["-I", "{jobs}/detach.py", "{pids}"]
"""


@pytest.fixture
def settings(tmp_home: Path, layout: dict[str, Path]) -> Settings:
    """The home's settings with the deploy account, read from a real farmhand.toml."""
    prepare_home(tmp_home, config(layout))
    loaded = load(home=tmp_home)
    retry = RetryConfig(base_delay=0.01, max_delay=0.05)
    return _replace_retry(loaded, retry)


def _replace_retry(settings: Settings, retry: RetryConfig) -> Settings:
    import dataclasses

    executor = dataclasses.replace(settings.executor, retry=retry)
    return dataclasses.replace(settings, executor=executor)


def coordinator_for(
    store: Store, clock: FakeClock, settings: Settings, *, knows_accounts: bool = True
) -> Coordinator:
    signer = Keyring(settings.home / "keys").signer("coordinator")
    accounts = settings.accounts if knows_accounts else None
    return Coordinator(store, clock, policy=settings.policy, signer=signer, accounts=accounts)


def secrets() -> SecretStore:
    return SecretStore({"DEPLOY_TOKEN": Secret("DEPLOY_TOKEN", TOKEN)}, {})


async def submit(co: Coordinator, key: str, command: str, *args: str) -> IntentStatus:
    request = SubmitRequest(
        kind="command.run",
        key=key,
        account="deploy",
        payload={"command": command, "args": list(args)},
        max_attempts=3,
    )
    return (await co.submit(request)).status


async def drain(store: Store, settings: Settings, clock: FakeClock) -> None:
    executor = Executor(store, settings, drain=True, clock=clock, secrets=secrets())
    await asyncio.wait_for(executor.run(), 30)


async def settle(store: Store, settings: Settings, clock: FakeClock, ref: str) -> IntentStatus:
    """Drain, crossing retry backoffs, until the intent is no longer active."""
    for _ in range(10):
        await drain(store, settings, clock)
        found = await store.get_intent(ref)
        assert found is not None
        if found.state not in (IntentState.PENDING, IntentState.RETRY_WAIT):
            return found
        clock.advance(1.0)
    raise AssertionError(f"{ref} still active: {found.state}")


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (exited, or a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.02)
    return False


def recorded_pids(paths: dict[str, Path]) -> list[int]:
    return [int(p) for p in paths["pids"].read_text().split()]


# -- allowed commands run ------------------------------------------------------------------


async def test_allowed_command_runs_and_its_output_is_in_the_receipt(
    store: Store, clock: FakeClock, settings: Settings, layout: dict[str, Path]
) -> None:
    co = coordinator_for(store, clock, settings)
    job = layout["jobs"] / "web.py"
    intent = await submit(co, "deploy-web-1", "deploy", "-I", str(job), "prod")
    done = await settle(store, settings, clock, intent.id)
    assert done.state is IntentState.SUCCEEDED, done.reason
    (receipt,) = done.receipts
    assert receipt.outcome is Outcome.SUCCEEDED
    detail = receipt.detail
    assert detail["command"] == "deploy"
    assert detail["exit_code"] == 0
    out = detail["stdout"].splitlines()
    assert out[0] == f"deploying {job} to prod"
    assert f"cwd={layout['work']}" in out
    assert "region=eu-1" in out
    # the environment is explicit: nothing of the executor's own, a fixed system PATH
    assert "home=<unset>" in out
    assert "path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in out
    # the account's secret reached the command, and the receipt shows it redacted
    assert "token=[redacted:DEPLOY_TOKEN]" in out
    assert TOKEN not in json.dumps(detail)
    assert detail["stderr"] == "a warning\n"


async def test_output_keeps_only_the_last_bytes(settings: Settings, tmp_path: Path) -> None:
    script = tmp_path / "loud.py"
    script.write_text("print('x' * 20000 + 'END')\n")
    account = AccountConfig(
        name="loud",
        connector={
            "output_limit": 100,
            "commands": [{"name": "loud", "path": PYTHON, "args": ["-I", str(script)]}],
        },
    )
    result = await CommandConnector().execute(make_call(account, "loud", "-I", str(script)))
    assert isinstance(result, Succeeded)
    assert result.detail["stdout"].endswith("xxxEND\n")
    assert len(result.detail["stdout"]) == 100
    assert result.detail["truncated"] == ["stdout"]


# -- nothing outside the allow-list runs -------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "fragment"),
    [
        ("rm", ["-rf", "/"], "'rm' is not on the allow-list of account 'deploy'"),
        ("deploy", ["-I", "{elsewhere}/evil.py", "prod"], "does not resolve inside"),
        ("deploy", ["-I", "{jobs}/sneaky.py", "prod"], "does not resolve inside"),
        ("deploy", ["-I", "{jobs}/../../elsewhere/evil.py", "prod"], "does not resolve inside"),
        ("deploy", ["-I", "{jobs}/web.py", "moon"], "is not one of staging, prod"),
        ("deploy", ["-c", "{jobs}/web.py", "prod"], "argument 1 must be '-I'"),
        ("deploy", ["-I", "{jobs}/web.py"], "takes 3 argument(s), the payload gives 2"),
        ("fail", ["-I", "{jobs}/fail.py", "1; touch x"], "does not match [0-9]+"),
    ],
)
async def test_outside_the_allow_list_is_refused_at_submit_and_dead_lettered(
    store: Store,
    clock: FakeClock,
    settings: Settings,
    layout: dict[str, Path],
    command: str,
    args: list[str],
    fragment: str,
) -> None:
    args = [a.format(jobs=layout["jobs"], elsewhere=layout["elsewhere"]) for a in args]
    with pytest.raises(InvalidInput) as refused:
        await submit(coordinator_for(store, clock, settings), "k-1", command, *args)
    assert fragment in str(refused.value)
    assert "\n" not in str(refused.value)
    if command != "rm":
        assert f"entry {command!r}" in str(refused.value)  # names the entry it broke
    # a host that does not configure the account stores it; the executor refuses to run it
    co = coordinator_for(store, clock, settings, knows_accounts=False)
    intent = await submit(co, "k-1", command, *args)
    done = await settle(store, settings, clock, intent.id)
    assert done.state is IntentState.DEAD
    assert done.reason is not None
    assert fragment in done.reason
    (receipt,) = done.receipts
    assert receipt.attempt == 0  # refused before any attempt
    assert receipt.source is ReceiptSource.EXECUTOR
    assert not layout["marker"].exists()


async def test_execute_refuses_by_itself_too(layout: dict[str, Path], settings: Settings) -> None:
    """Whoever calls the connector, a command outside the allow-list never starts."""
    account = settings.accounts["deploy"]
    evil = str(layout["elsewhere"] / "evil.py")
    result = await CommandConnector().execute(make_call(account, "deploy", "-I", evil, "prod"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "does not resolve inside" in result.error
    assert not layout["marker"].exists()


def test_the_cli_refuses_at_submit(tmp_home: Path, layout: dict[str, Path]) -> None:
    prepare_home(tmp_home, config(layout))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(tmp_home)
    payload = json.dumps({"command": "deploy", "args": ["-I", "/etc/passwd", "prod"]})
    argv = [FARMHAND, "submit", "command.run", "--key", "k", "--account", "deploy"]
    done = subprocess.run(
        [*argv, "--payload", payload],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "entry 'deploy'" in done.stderr
    assert "does not resolve inside" in done.stderr


# -- exit codes ---------------------------------------------------------------------------


async def test_nonzero_exit_is_a_permanent_failure_with_stderr(
    store: Store, clock: FakeClock, settings: Settings, layout: dict[str, Path]
) -> None:
    co = coordinator_for(store, clock, settings)
    intent = await submit(co, "fail-3", "fail", "-I", str(layout["jobs"] / "fail.py"), "3")
    done = await settle(store, settings, clock, intent.id)
    assert done.state is IntentState.DEAD
    assert done.attempts == 1
    assert done.receipts[-1].error is not None
    assert "exited with 3" in done.receipts[-1].error
    assert "cannot reach the cluster" in done.receipts[-1].error


async def test_retryable_exit_code_is_retried(
    store: Store, clock: FakeClock, settings: Settings, layout: dict[str, Path]
) -> None:
    co = coordinator_for(store, clock, settings)
    intent = await submit(co, "fail-75", "fail", "-I", str(layout["jobs"] / "fail.py"), "75")
    done = await settle(store, settings, clock, intent.id)
    assert done.state is IntentState.DEAD
    assert done.attempts == 3  # every attempt used
    assert [r.retryable for r in done.receipts] == [True, True, True]


# -- timeouts kill the whole process group -----------------------------------------------------


async def test_hanging_command_is_killed_at_its_timeout(
    store: Store, clock: FakeClock, settings: Settings, layout: dict[str, Path]
) -> None:
    co = coordinator_for(store, clock, settings)
    intent = await submit(
        co, "hang-1", "hang", "-I", f"{layout['jobs']}/hang.py", str(layout["pids"])
    )
    started = time.monotonic()
    done = await settle(store, settings, clock, intent.id)
    assert time.monotonic() - started < 10
    pids = recorded_pids(layout)
    assert wait_gone(pids), f"still running: {[p for p in pids if not gone(p)]}"
    # not idempotent: it may have done its work, so a human decides
    assert done.state is IntentState.UNKNOWN
    assert done.attempts == 1
    error = done.receipts[-1].error or ""
    assert "still running after 0.5s" in error
    assert "started" in error  # its output so far


async def test_a_command_ignoring_sigterm_is_killed(
    settings: Settings, layout: dict[str, Path]
) -> None:
    account = settings.accounts["deploy"]
    args = ["-I", f"{layout['jobs']}/hang.py", str(layout["pids"]), "--ignore-term"]
    started = time.monotonic()
    result = await CommandConnector().execute(make_call(account, "hang-stubborn", *args))
    assert time.monotonic() - started < 5
    assert isinstance(result, Uncertain)
    assert wait_gone(recorded_pids(layout))


async def test_idempotent_entry_is_retried_after_a_timeout(
    settings: Settings, layout: dict[str, Path]
) -> None:
    account = settings.accounts["deploy"]
    args = ["-I", f"{layout['jobs']}/hang.py", str(layout["pids"])]
    result = await CommandConnector().execute(make_call(account, "hang-idempotent", *args))
    assert isinstance(result, Failed)
    assert result.retryable
    assert wait_gone(recorded_pids(layout))


async def test_cancelled_call_kills_the_command(
    settings: Settings, layout: dict[str, Path]
) -> None:
    # a command well within its own timeout when the executor gives up (shutdown)
    args = ["-I", f"{layout['jobs']}/hang.py", str(layout["pids"])]
    call = make_call(slow_account(settings), "hang", *args, timeout=30.0)
    task = asyncio.create_task(CommandConnector().execute(call))
    for _ in range(200):
        if layout["pids"].exists() and layout["pids"].read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_gone(recorded_pids(layout))


def slow_account(settings: Settings) -> AccountConfig:
    """The deploy account with every command allowed 30 s."""
    configured = settings.accounts["deploy"].connector
    commands = [{**entry, "timeout": 30.0} for entry in configured["commands"]]
    return AccountConfig(name="deploy", connector={**configured, "commands": commands})


async def test_the_executors_call_timeout_bounds_the_command(
    settings: Settings, layout: dict[str, Path]
) -> None:
    args = ["-I", f"{layout['jobs']}/hang.py", str(layout["pids"])]
    started = time.monotonic()
    call = make_call(slow_account(settings), "hang", *args, timeout=1.5)
    result = await CommandConnector().execute(call)
    # killed before the executor would give up on the call (1.5 s), grace included
    assert time.monotonic() - started < 1.5
    assert isinstance(result, Uncertain)
    assert "its timeout of 30s was cut to fit the executor's call timeout of 1.5s" in result.error
    assert wait_gone(recorded_pids(layout))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"path": "/nonexistent/bin/deploy"}, "No such file or directory"),
        ({"working_dir": "/nonexistent/work"}, "cannot start in /nonexistent/work"),
    ],
)
async def test_a_command_that_cannot_start_fails_permanently(
    tmp_path: Path, change: dict[str, Any], fragment: str
) -> None:
    entry = {"name": "x", "path": PYTHON, "args": ["-c", "pass"], **change}
    account = AccountConfig(name="ops", connector={"commands": [entry]})
    result = await CommandConnector().execute(make_call(account, "x", "-c", "pass"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert fragment in result.error


async def test_children_holding_the_output_do_not_outlive_the_call(
    settings: Settings, layout: dict[str, Path]
) -> None:
    account = settings.accounts["deploy"]
    args = ["-I", f"{layout['jobs']}/detach.py", str(layout["pids"])]
    started = time.monotonic()
    result = await CommandConnector().execute(make_call(account, "detach", *args))
    assert time.monotonic() - started < 5
    assert isinstance(result, Succeeded)
    assert result.detail["stdout"] == "detached\n"
    assert wait_gone(recorded_pids(layout))


# -- settings and payload validation -----------------------------------------------------------


def make_call(account: AccountConfig, command: str, *args: str, timeout: float = 10.0) -> Call:
    payload: dict[str, Any] = {"command": command, "args": list(args)}
    intent = Intent(
        id="in_cmd",
        key="cmd-key",
        kind="command.run",
        account=account.name,
        payload=payload,
        payload_hash=payload_hash(payload),
        created_at=datetime.now(UTC),
    )
    return Call(
        intent=intent,
        attempt=1,
        account=account,
        timeout=timeout,
        secret=Secret("DEPLOY_TOKEN", TOKEN),
    )


@pytest.mark.parametrize(
    ("connector", "fragment"),
    [
        ({"commands": [{"name": "x", "path": "nomad"}]}, "path must be an absolute path"),
        ({"commands": [{"name": "x", "path": "/bin/true", "args": [{"regex": "("}]}]}, "regex"),
        (
            {
                "commands": [
                    {"name": "x", "path": "/bin/true", "args": [{"regex": "a", "one_of": ["a"]}]}
                ]
            },
            "exactly one of",
        ),
        (
            {"commands": [{"name": "x", "path": "/bin/true"}, {"name": "x", "path": "/bin/ls"}]},
            "unique",
        ),
        ({"commands": [], "working_dir": "srv"}, "working_dir must be an absolute path"),
        ({"commands": [], "env": {"A B": "1"}}, "not a variable name"),
        ({"commands": [], "shell": True}, "shell"),
    ],
)
def test_bad_settings_are_named(connector: dict[str, Any], fragment: str) -> None:
    account = AccountConfig(name="ops", connector=connector)
    with pytest.raises(InvalidInput) as bad:
        CommandSettings.of(account)
    assert "[accounts.ops.connector] for command.run" in str(bad.value)
    assert fragment in str(bad.value)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "command"),
        ({"command": "x", "args": "job run"}, "args"),
        ({"command": "x", "args": ["a\0b"]}, "NUL"),
        ({"command": "x", "shell": "rm -rf /"}, "shell"),
    ],
)
def test_bad_payloads_are_refused(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as bad:
        CommandConnector().validate(payload, "k")
    assert str(bad.value).startswith("command.run payload")
    assert fragment in str(bad.value)


def test_idempotent_only_when_every_entry_is() -> None:
    def account(*flags: bool) -> AccountConfig:
        entries = [
            {"name": f"c{i}", "path": "/bin/true", "idempotent": f} for i, f in enumerate(flags)
        ]
        return AccountConfig(name="ops", connector={"commands": entries})

    connector = CommandConnector()
    assert connector.idempotent(account(True, True))
    assert not connector.idempotent(account(True, False))
    assert not connector.idempotent(account())


def test_schema_command_run(tmp_home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(tmp_home)
    done = subprocess.run(
        [FARMHAND, "schema", "command.run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert schema["required"] == ["command"]
    assert set(schema["properties"]) == {"command", "args"}
    assert schema["additionalProperties"] is False
