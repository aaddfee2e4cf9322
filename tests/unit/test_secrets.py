"""Executor-side secrets: where they come from, what is refused, and how they reach a call.

Values are never in a message, a repr or a stored record; only names are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from farmhand import secrets
from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, BreakerConfig, Limit, Settings
from farmhand.connectors import Call, ConnectorSet, Failed, Result
from farmhand.connectors.noop import NoopConnector
from farmhand.connectors.webhook import WebhookConnector
from farmhand.contracts import IntentState
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.executor import Executor
from farmhand.secrets import Secret, SecretsError, SecretStore
from farmhand.store import IntentQuery, Store
from farmhand.testing.sink import WebhookSink

VALUE = "CANARY-0123456789abcdef"


def write_secrets(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def with_accounts(settings: Settings, **secret_by_account: str | None) -> Settings:
    accounts = {
        name: AccountConfig(name=name, secret=secret) for name, secret in secret_by_account.items()
    }
    return dataclasses.replace(settings, accounts=accounts)


@pytest.fixture
def no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's FARMHAND_SECRET* variables do not leak into the test."""
    for name in list(os.environ):
        if name.startswith("FARMHAND_SECRET"):
            monkeypatch.delenv(name)


# -- Secret -------------------------------------------------------------------------------------


def test_secret_shows_only_its_name() -> None:
    secret = Secret("BILLING_TOKEN", VALUE)
    shown_as = [repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>40}"]
    shown_as.append("%s" % secret)  # noqa: UP031
    for shown in shown_as:
        assert VALUE not in shown
        assert "BILLING_TOKEN" in shown
    assert secret.reveal() == VALUE
    assert secret == Secret("BILLING_TOKEN", VALUE)
    assert secret != Secret("BILLING_TOKEN", "other")


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Secret("T", VALUE))


def test_call_repr_hides_the_secret() -> None:
    call = Call(
        intent=None,  # type: ignore[arg-type]
        attempt=1,
        account=AccountConfig(name="billing", secret="T"),
        timeout=1.0,
        secret=Secret("T", VALUE),
    )
    assert VALUE not in repr(call)
    assert "Secret('T')" in repr(call)


@pytest.mark.parametrize(
    ("name", "variable"),
    [
        ("BILLING_TOKEN", "FARMHAND_SECRET_BILLING_TOKEN"),
        ("billing-token", "FARMHAND_SECRET_BILLING_TOKEN"),
        ("a.b c/d", "FARMHAND_SECRET_A_B_C_D"),
        ("x9", "FARMHAND_SECRET_X9"),
    ],
)
def test_env_name(name: str, variable: str) -> None:
    assert secrets.env_name(name) == variable


# -- loading ------------------------------------------------------------------------------------


def test_environment_secrets(settings: Settings, no_secret_env: None) -> None:
    env = {"FARMHAND_SECRET_BILLING_TOKEN": VALUE, "FARMHAND_SECRET_": "x", "OTHER": "y"}
    held = secrets.load(settings, env)
    found = held.get("billing-token")
    assert found is not None
    assert found.reveal() == VALUE
    assert found.name == "billing-token"
    assert held.get("BILLING_TOKEN") is not None
    assert held.get("missing") is None
    assert len(held) == 1
    assert held.file is None


def test_secrets_file_in_home(settings: Settings) -> None:
    write_secrets(settings.home / "secrets.toml", f'billing = "{VALUE}"\n"with-dash" = "v2"\n')
    held = secrets.load(settings, {})
    assert held.file == settings.home / "secrets.toml"
    billing = held.get("billing")
    assert billing is not None
    assert billing.reveal() == VALUE
    assert "with-dash" in held
    assert "WITH_DASH" in held  # the normalised name finds it too
    assert "nope" not in held


def test_environment_wins_over_the_file(settings: Settings) -> None:
    write_secrets(settings.home / "secrets.toml", 'billing = "from-file"\n')
    held = secrets.load(settings, {"FARMHAND_SECRET_BILLING": "from-env"})
    found = held.get("billing")
    assert found is not None
    assert found.reveal() == "from-env"


def test_secrets_file_named_by_the_environment(settings: Settings, tmp_path: Path) -> None:
    path = write_secrets(tmp_path / "elsewhere" / "s.toml", f'T = "{VALUE}"\n')
    held = secrets.load(settings, {"FARMHAND_SECRETS_FILE": str(path)})
    assert held.file == path
    assert "T" in held


def test_named_secrets_file_must_exist(settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SecretsError, match="does not exist") as caught:
        secrets.load(settings, {"FARMHAND_SECRETS_FILE": str(missing)})
    assert str(missing) in str(caught.value)


def test_no_secrets_file_is_fine(settings: Settings) -> None:
    held = secrets.load(settings, {})
    assert len(held) == 0
    assert held.file is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_loose_permissions_are_refused(settings: Settings, mode: int) -> None:
    path = write_secrets(settings.home / "secrets.toml", f'T = "{VALUE}"\n', mode)
    with pytest.raises(SecretsError) as caught:
        secrets.load(settings, {})
    message = str(caught.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert "\n" not in message
    assert VALUE not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(settings: Settings, mode: int) -> None:
    write_secrets(settings.home / "secrets.toml", f'T = "{VALUE}"\n', mode)
    assert "T" in secrets.load(settings, {})


def test_secrets_file_in_a_synced_folder_is_refused(settings: Settings, tmp_path: Path) -> None:
    synced = tmp_path / "Sync"
    (synced / ".stfolder").mkdir(parents=True)
    path = write_secrets(synced / "secrets.toml", f'T = "{VALUE}"\n')
    with pytest.raises(SecretsError, match="Syncthing") as caught:
        secrets.load(settings, {"FARMHAND_SECRETS_FILE": str(path)})
    assert VALUE not in str(caught.value)


def test_secrets_file_in_the_store_folder_is_refused(settings: Settings, tmp_path: Path) -> None:
    store_dir = tmp_path / "shared-store"
    store_dir.mkdir()
    moved = dataclasses.replace(settings, store_url=f"sqlite://{store_dir}/farmhand.db")
    path = write_secrets(store_dir / "secrets.toml", f'T = "{VALUE}"\n')
    with pytest.raises(SecretsError, match="store's folder"):
        secrets.load(moved, {"FARMHAND_SECRETS_FILE": str(path)})
    # the default layout, store and secrets both directly in the home, is allowed
    write_secrets(settings.home / "secrets.toml", f'T = "{VALUE}"\n')
    assert "T" in secrets.load(settings, {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'T = "{VALUE}"\nbroken line\n', "not valid TOML"),
        ("T = 42\n", "T is not a string"),
        (f'[T]\nx = "{VALUE}"\n', "T is not a string"),
        ('T = ""\n', "T is empty"),
    ],
)
def test_bad_secrets_files_are_refused_without_values(
    settings: Settings, text: str, expected: str
) -> None:
    write_secrets(settings.home / "secrets.toml", text)
    with pytest.raises(SecretsError, match=expected) as caught:
        secrets.load(settings, {})
    assert VALUE not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_lists_names_and_accounts(settings: Settings) -> None:
    configured = with_accounts(settings, a="T1", b="T1", c="T2", d=None)
    held = SecretStore({"T2": Secret("T2", "v")}, {})
    assert secrets.missing(configured, held) == {"T1": ["a", "b"]}


def test_redactor_labels_environment_values_by_the_accounts_names() -> None:
    held = SecretStore({"BILLING_TOKEN": Secret("BILLING_TOKEN", VALUE)}, {})
    redactor = held.redactor(["billing-token"])
    assert redactor.text(f"x {VALUE} y") == "x [redacted:billing-token] y"
    assert held.redactor().text(VALUE) == "[redacted:BILLING_TOKEN]"


# -- the executor -------------------------------------------------------------------------------


class RecordingNoop(NoopConnector):
    """Records each call; fails with the secret in its error when the payload says so."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def execute(self, call: Call) -> Result:
        self.calls.append(call)
        leak = call.intent.payload.get("leak")
        if leak:
            value = call.secret.reveal() if call.secret else "none"
            if leak == "retry":  # a 429-like answer: pauses the account, counts for the breaker
                return Failed(error=f"slow down, {value}", retryable=True, retry_after=30.0)
            return Failed(error=f"provider said: bad token {value}", retryable=False)
        return await super().execute(call)


async def drain(
    store: Store, settings: Settings, clock: FakeClock, connector: NoopConnector, **kw: Any
) -> Executor:
    connectors = ConnectorSet()
    connectors._live["noop"] = connector
    executor = Executor(store, settings, drain=True, clock=clock, connectors=connectors, **kw)
    await asyncio.wait_for(executor.run(), 20)
    return executor


async def test_executor_fills_the_accounts_secret(
    store: Store, coordinator: Coordinator, settings: Settings, clock: FakeClock
) -> None:
    configured = with_accounts(settings, billing="BILLING_TOKEN", plain=None)
    await coordinator.submit(SubmitRequest(kind="noop", key="a", payload={}, account="billing"))
    await coordinator.submit(SubmitRequest(kind="noop", key="b", payload={}, account="plain"))
    held = SecretStore({"BILLING_TOKEN": Secret("BILLING_TOKEN", VALUE)}, {})
    connector = RecordingNoop()
    await drain(store, configured, clock, connector, secrets=held)
    by_key = {c.intent.key: c for c in connector.calls}
    billing = by_key["a"].secret
    assert billing is not None
    assert billing.reveal() == VALUE
    assert by_key["b"].secret is None
    listed = await coordinator.list_intents(IntentQuery())
    assert {s.state for s in listed} == {IntentState.SUCCEEDED}


async def test_missing_secret_dead_letters_before_any_call(
    store: Store, coordinator: Coordinator, settings: Settings, clock: FakeClock
) -> None:
    configured = with_accounts(settings, billing="BILLING_TOKEN")
    submitted = await coordinator.submit(
        SubmitRequest(kind="noop", key="a", payload={}, account="billing")
    )
    connector = RecordingNoop()
    await drain(store, configured, clock, connector, secrets=SecretStore.empty())
    assert connector.calls == []
    status = await coordinator.status(submitted.status.id)
    assert status.state is IntentState.DEAD
    assert status.reason is not None
    assert "BILLING_TOKEN" in status.reason
    assert "FARMHAND_SECRET_BILLING_TOKEN" in status.reason
    (receipt,) = status.receipts
    assert receipt.attempt == 0
    assert receipt.error == status.reason


async def test_secret_echoed_in_an_error_is_redacted_before_it_is_stored(
    store: Store, coordinator: Coordinator, settings: Settings, clock: FakeClock
) -> None:
    configured = with_accounts(settings, billing="BILLING_TOKEN")
    submitted = await coordinator.submit(
        SubmitRequest(kind="noop", key="a", payload={"leak": True}, account="billing")
    )
    held = SecretStore({"BILLING_TOKEN": Secret("BILLING_TOKEN", VALUE)}, {})
    await drain(store, configured, clock, RecordingNoop(), secrets=held)
    status = await coordinator.status(submitted.status.id)
    assert status.state is IntentState.DEAD
    assert status.reason is not None
    assert "[redacted:BILLING_TOKEN]" in status.reason
    (receipt,) = status.receipts
    assert receipt.error == "provider said: bad token [redacted:BILLING_TOKEN]"
    events = await store.audit(submitted.status.id)
    dumped = status.model_dump_json() + "".join(e.model_dump_json() for e in events)
    assert VALUE not in dumped


async def test_no_table_keeps_a_secret_from_a_retryable_failure(
    store: Store, coordinator: Coordinator, settings: Settings, clock: FakeClock, tmp_home: Path
) -> None:
    """Rate-limit pauses and circuit breakers keep the error too: they get it redacted."""
    account = AccountConfig(name="billing", secret="BILLING_TOKEN", limit=Limit(5.0, 5))
    configured = dataclasses.replace(
        settings,
        accounts={"billing": account},
        breaker=BreakerConfig(failures=1, cooldown=60.0),
    )
    await coordinator.submit(
        SubmitRequest(kind="noop", key="a", payload={"leak": "retry"}, account="billing")
    )
    held = SecretStore({"BILLING_TOKEN": Secret("BILLING_TOKEN", VALUE)}, {})
    connector = RecordingNoop()
    await drain(store, configured, clock, connector, secrets=held)
    assert len(connector.calls) == 1
    with sqlite3.connect(tmp_home / "farmhand.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        texts = [
            str(value)
            for table in tables
            for row in db.execute(f'SELECT * FROM "{table}"')
            for value in row
        ]
    db.close()
    joined = "\n".join(texts)
    assert "[redacted:BILLING_TOKEN]" in joined
    assert VALUE not in joined


async def test_executor_loads_secrets_itself_by_default(
    store: Store,
    coordinator: Coordinator,
    settings: Settings,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    no_secret_env: None,
) -> None:
    monkeypatch.setenv("FARMHAND_SECRET_BILLING_TOKEN", VALUE)
    configured = with_accounts(settings, billing="BILLING_TOKEN")
    await coordinator.submit(SubmitRequest(kind="noop", key="a", payload={}, account="billing"))
    connector = RecordingNoop()
    await drain(store, configured, clock, connector)
    (call,) = connector.calls
    assert call.secret is not None
    assert call.secret.reveal() == VALUE


def test_executor_refuses_a_loose_secrets_file(
    store: Store, settings: Settings, no_secret_env: None
) -> None:
    write_secrets(settings.home / "secrets.toml", f'T = "{VALUE}"\n', 0o644)
    with pytest.raises(SecretsError, match="chmod 600"):
        Executor(store, settings)


# -- the webhook connector --------------------------------------------------------------------


def webhook_call(url: str, secret: Secret | None, headers: dict[str, str] | None = None) -> Call:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]  # build_intent needs no store
    payload: dict[str, Any] = {"url": url, "json": {"n": 1}}
    if headers:
        payload["headers"] = headers
    intent = coordinator.build_intent(
        SubmitRequest(kind="webhook.post", key="k-1", payload=payload, account="billing")
    )
    account = AccountConfig(name="billing", secret=secret.name if secret else None)
    return Call(intent=intent, attempt=1, account=account, timeout=5.0, secret=secret)


async def test_webhook_sends_the_secret_as_a_bearer_token() -> None:
    connector = WebhookConnector()
    try:
        with WebhookSink() as sink:
            secret = Secret("BILLING_TOKEN", VALUE)
            await connector.execute(
                webhook_call(f"{sink.url}/ok", secret, {"authorization": "Bearer agent-chosen"})
            )
            await connector.execute(webhook_call(f"{sink.url}/ok", None))
            with_secret, without = sink.calls()
    finally:
        await connector.aclose()
    # the account's credential replaces whatever the payload asked for
    assert with_secret.authorization == f"Bearer {VALUE}"
    assert without.authorization is None


def test_log_records_of_the_executor_never_show_a_call(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret("BILLING_TOKEN", VALUE)
    with caplog.at_level(logging.INFO):
        logging.getLogger("farmhand.test").info(
            "call %r with %s", webhook_call("http://x/", secret), secret
        )
    assert VALUE not in caplog.text
