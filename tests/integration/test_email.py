"""``email.send`` against real servers on loopback: aiosmtpd (SMTP with AUTH, STARTTLS and
implicit TLS, trusted through a CA file) and Debian's dovecot (IMAP) for reconciliation.

The crash tests run real ``farmhand executor run`` processes and SIGKILL one while the SMTP
server holds its reply to DATA: the message has been sent, the executor never learns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backends import server_missing
from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, RetryConfig, Settings, load
from farmhand.connectors.base import Call, Failed, Succeeded, Uncertain
from farmhand.connectors.email import EmailConnector, EmailSettings, build_message, message_id
from farmhand.contracts import Attempt, Intent, IntentState, IntentStatus, Outcome, ReceiptSource
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidInput
from farmhand.executor import Executor
from farmhand.keys import Keyring
from farmhand.secrets import Secret, SecretStore
from farmhand.store import Store
from homes import prepare_home
from mailservers import (
    PASSWORD,
    USER,
    Dovecot,
    DovecotUnavailable,
    SmtpServer,
    free_port,
    self_signed,
)

FARMHAND = str(Path(sys.executable).with_name("farmhand"))
SUBMIT = [FARMHAND, "submit", "email.send"]
SENDER = "Farmhand Bot <bot@example.org>"
PAYLOAD: dict[str, Any] = {
    "from": SENDER,
    "to": ["Alice <alice@example.com>"],
    "cc": ["carol@example.com"],
    "bcc": ["audit@example.net"],
    "subject": "Deploy of web finished",
    "text": "web v42 is live.\n.\nA line with a lone dot above.\n",
    "html": "<p>web <b>v42</b> is live.</p>",
    "headers": {"X-Deploy": "web-42"},
}


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert() -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for localhost/127.0.0.1 (readable by dovecot's users)."""
    if shutil.which("openssl") is None:
        server_missing("openssl (to make a test certificate)", "not on PATH")
    directory = Path(tempfile.mkdtemp(prefix="farmhand-mail-"))
    directory.chmod(0o755)
    try:
        yield self_signed(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def smtp(cert: tuple[Path, Path]) -> Iterator[SmtpServer]:
    """aiosmtpd requiring STARTTLS, then AUTH."""
    server = SmtpServer("starttls", cert).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dovecot(cert: tuple[Path, Path]) -> Iterator[Dovecot]:
    root = Path(tempfile.mkdtemp(prefix="farmhand-dovecot-"))
    root.chmod(0o755)
    try:
        try:
            server = Dovecot(root, cert).start()
        except DovecotUnavailable as exc:
            server_missing("dovecot (IMAP)", exc)
            raise
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def filing_smtp(cert: tuple[Path, Path], dovecot: Dovecot) -> Iterator[SmtpServer]:
    """aiosmtpd that files a copy of every accepted message in the IMAP "Sent" folder."""
    server = SmtpServer(
        "starttls", cert, on_accept=lambda got: dovecot.append("Sent", got.data, cert[0])
    ).start()
    try:
        yield server
    finally:
        server.stop()


def settings_for(server: SmtpServer, cert: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    connector: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "security": server.security,
        "ca_file": str(cert[0]),
        "helo": "executor.example.org",
    }
    if server.security != "plain":
        connector["username"] = USER
    connector.update(extra)
    return connector


def account_for(server: SmtpServer, cert: tuple[Path, Path], **extra: Any) -> AccountConfig:
    return AccountConfig(
        name="mail",
        kinds=("email.send",),
        secret="MAIL_PASSWORD",
        connector=settings_for(server, cert, **extra),
    )


def make_call(
    account: AccountConfig,
    payload: dict[str, Any] | None = None,
    key: str = "deploy-web-42",
    timeout: float = 10.0,
    password: str = PASSWORD,
) -> Call:
    payload = PAYLOAD if payload is None else payload
    intent = Intent(
        id="in_mail",
        key=key,
        kind="email.send",
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
        secret=Secret("MAIL_PASSWORD", password),
    )


# -- delivery --------------------------------------------------------------------------------


async def test_starttls_auth_delivery_carries_the_derived_message_id(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    result = await EmailConnector().execute(make_call(account_for(smtp, cert)))
    assert isinstance(result, Succeeded), result
    expected = message_id("deploy-web-42", SENDER)
    assert result.external_id == expected
    assert result.detail["accepted"] == [
        "alice@example.com",
        "carol@example.com",
        "audit@example.net",
    ]
    assert result.detail["reply"].startswith("250 ")
    (got,) = smtp.messages()
    assert got.login == USER
    assert got.sender == "bot@example.org"
    assert got.recipients == ["alice@example.com", "carol@example.com", "audit@example.net"]
    message = got.message
    assert message["Message-ID"] == expected
    assert message["X-Deploy"] == "web-42"
    assert message["Bcc"] is None  # envelope only
    assert message["To"] == "Alice <alice@example.com>"
    assert message.is_multipart()
    text = message.get_payload()[0].get_payload()  # type: ignore[index,union-attr]
    assert "\n.\nA line with a lone dot" in text.replace("\r\n", "\n")


def test_message_id_is_derived_from_the_key() -> None:
    first = message_id("deploy-web-42", SENDER)
    assert first == message_id("deploy-web-42", "other name <BOT@Example.ORG>")
    assert first != message_id("deploy-web-43", SENDER)
    assert first.endswith("@farmhand.example.org>")
    assert len(first.split("@")[0]) == 33  # "<" + 32 hex digits
    # every attempt builds the same Message-ID
    payload = EmailConnector._payload(PAYLOAD)
    assert build_message(payload, "k")["Message-ID"] == build_message(payload, "k")["Message-ID"]


async def test_implicit_tls_delivery(cert: tuple[Path, Path]) -> None:
    server = SmtpServer("tls", cert).start()
    try:
        result = await EmailConnector().execute(make_call(account_for(server, cert)))
        assert isinstance(result, Succeeded), result
        (got,) = server.messages()
        assert got.login == USER
    finally:
        server.stop()


async def test_plain_delivery_to_a_loopback_relay(cert: tuple[Path, Path]) -> None:
    server = SmtpServer("plain").start()
    try:
        result = await EmailConnector().execute(make_call(account_for(server, cert)))
        assert isinstance(result, Succeeded), result
        (got,) = server.messages()
        assert got.login is None
    finally:
        server.stop()


async def test_untrusted_certificate_is_a_permanent_failure(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    account = account_for(smtp, cert, ca_file=None)  # the system CAs do not know ours
    result = await EmailConnector().execute(make_call(account))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "not trusted" in result.error
    assert "ca_file" in result.error
    assert smtp.messages() == []


async def test_missing_ca_file_is_a_permanent_failure(
    smtp: SmtpServer, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    account = account_for(smtp, cert, ca_file=str(tmp_path / "missing.pem"))
    result = await EmailConnector().execute(make_call(account))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "cannot load ca_file" in result.error
    assert smtp.messages() == []


async def test_wrong_password_is_permanent_and_redacted(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    result = await EmailConnector().execute(make_call(account_for(smtp, cert), password="nope-x1"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "535" in result.error
    assert "nope-x1" not in result.error
    assert smtp.messages() == []


# -- refusals ----------------------------------------------------------------------------------


async def test_every_recipient_refused_with_550_is_permanent(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    for local in ("alice", "carol", "audit"):
        smtp.reply_to_rcpt(local, "550 5.1.1 No such user")
    result = await EmailConnector().execute(make_call(account_for(smtp, cert)))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "every recipient refused" in result.error
    assert "alice@example.com: 550 5.1.1 No such user" in result.error
    assert smtp.messages() == []


async def test_some_recipients_refused_still_sends_to_the_rest(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    smtp.reply_to_rcpt("carol", "550 5.1.1 No such user")
    result = await EmailConnector().execute(make_call(account_for(smtp, cert)))
    assert isinstance(result, Succeeded)
    assert result.detail["accepted"] == ["alice@example.com", "audit@example.net"]
    assert result.detail["refused"] == {"carol@example.com": "550 5.1.1 No such user"}
    assert smtp.messages()[0].recipients == ["alice@example.com", "audit@example.net"]


async def test_temporary_recipient_refusal_is_retryable(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    smtp.reply_to_rcpt("solo", "450 4.2.1 Mailbox busy")
    payload = {**PAYLOAD, "to": ["solo@example.com"], "cc": [], "bcc": []}
    result = await EmailConnector().execute(make_call(account_for(smtp, cert), payload))
    assert isinstance(result, Failed)
    assert result.retryable


async def test_550_after_data_is_permanent(smtp: SmtpServer, cert: tuple[Path, Path]) -> None:
    smtp.reply_to_data("550 5.7.1 Message rejected as spam")
    result = await EmailConnector().execute(make_call(account_for(smtp, cert)))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "550 5.7.1 Message rejected as spam" in result.error


async def test_connection_refused_is_retryable(cert: tuple[Path, Path]) -> None:
    account = AccountConfig(
        name="mail",
        secret="MAIL_PASSWORD",
        connector={"host": "127.0.0.1", "port": free_port(), "username": USER},
    )
    result = await EmailConnector().execute(make_call(account))
    assert isinstance(result, Failed)
    assert result.retryable
    assert "during connect" in result.error


async def test_lost_reply_after_data_is_uncertain_and_sent_once(
    smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    smtp.hold_data()
    result = await EmailConnector().execute(make_call(account_for(smtp, cert), timeout=1.0))
    assert isinstance(result, Uncertain)
    assert "may have been accepted" in result.error
    assert message_id("deploy-web-42", SENDER) in result.error
    assert len(smtp.messages()) == 1


# -- through an executor -------------------------------------------------------------------------


def mail_config(connector: dict[str, Any]) -> str:
    lines = [
        "[accounts.mail]",
        'kinds = ["email.send"]',
        'secret = "MAIL_PASSWORD"',
        "[accounts.mail.connector]",
    ]
    imap = connector.pop("imap", None)
    lines += [f"{name} = {json.dumps(value)}" for name, value in connector.items()]
    if imap is not None:
        lines.append("[accounts.mail.connector.imap]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in imap.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def mail_settings(tmp_home: Path, smtp: SmtpServer, cert: tuple[Path, Path]) -> Settings:
    prepare_home(tmp_home, mail_config(settings_for(smtp, cert)))
    loaded = load(home=tmp_home)
    executor = dataclasses.replace(
        loaded.executor, retry=RetryConfig(base_delay=0.01, max_delay=0.05)
    )
    return dataclasses.replace(loaded, executor=executor)


async def settle(
    store: Store, settings: Settings, clock: FakeClock, ref: str, **kw: Any
) -> IntentStatus:
    secrets = SecretStore({"MAIL_PASSWORD": Secret("MAIL_PASSWORD", PASSWORD)}, {})
    for _ in range(10):
        executor = Executor(store, settings, drain=True, clock=clock, secrets=secrets, **kw)
        await asyncio.wait_for(executor.run(), 30)
        found = await store.get_intent(ref)
        assert found is not None
        if found.state not in (IntentState.PENDING, IntentState.RETRY_WAIT):
            return found
        clock.advance(1.0)
    raise AssertionError(f"{ref} still active")


async def submit(store: Store, clock: FakeClock, settings: Settings, key: str) -> IntentStatus:
    signer = Keyring(settings.home / "keys").signer("coordinator")
    co = Coordinator(
        store, clock, policy=settings.policy, signer=signer, accounts=settings.accounts
    )
    request = SubmitRequest(kind="email.send", key=key, account="mail", payload=PAYLOAD)
    return (await co.submit(request)).status


async def test_451_then_success_on_retry(
    store: Store, clock: FakeClock, mail_settings: Settings, smtp: SmtpServer
) -> None:
    smtp.reply_to_data("451 4.3.0 Try again later")
    intent = await submit(store, clock, mail_settings, "retry-1")
    done = await settle(store, mail_settings, clock, intent.id)
    assert done.state is IntentState.SUCCEEDED
    assert [r.outcome for r in done.receipts] == [Outcome.FAILED, Outcome.SUCCEEDED]
    assert done.receipts[0].retryable
    assert "451 4.3.0 Try again later" in (done.receipts[0].error or "")
    assert done.receipts[1].external_id == message_id("retry-1", SENDER)
    assert done.receipts[1].detail["accepted"][0] == "alice@example.com"
    assert len(smtp.messages()) == 1


async def test_550_is_dead_lettered(
    store: Store, clock: FakeClock, mail_settings: Settings, smtp: SmtpServer
) -> None:
    for local in ("alice", "carol", "audit"):
        smtp.reply_to_rcpt(local, "550 5.1.1 No such user")
    intent = await submit(store, clock, mail_settings, "refused-1")
    done = await settle(store, mail_settings, clock, intent.id)
    assert done.state is IntentState.DEAD
    assert done.attempts == 1
    assert smtp.messages() == []


async def test_timeout_after_data_parks_the_intent_in_unknown(
    store: Store, clock: FakeClock, mail_settings: Settings, smtp: SmtpServer
) -> None:
    smtp.hold_data()
    intent = await submit(store, clock, mail_settings, "held-1")
    done = await settle(store, mail_settings, clock, intent.id, call_timeout=1.0)
    assert done.state is IntentState.UNKNOWN
    assert done.receipts[-1].outcome is Outcome.UNKNOWN
    smtp.release.set()
    await settle(store, mail_settings, clock, intent.id)  # nothing more runs
    assert len(smtp.messages()) == 1


# -- a real executor process killed after the server took the message -------------------------


class ExecutorProcess:
    """``farmhand executor run`` in a subprocess that never outlives the test."""

    def __init__(self, env: dict[str, str], logs: Path, *args: str) -> None:
        self.log = logs
        self._err = logs.open("ab")
        self.popen = subprocess.Popen(
            [FARMHAND, "executor", "run", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)
        self._err.close()

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        self._err.close()
        return code


def farmhand_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    env["FARMHAND_SECRET_MAIL_PASSWORD"] = PASSWORD
    return env


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [FARMHAND, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def crash_after_data(home: Path, server: SmtpServer, connector: dict[str, Any]) -> dict[str, Any]:
    """Submit one email, SIGKILL the executor sending it while the server holds its reply
    to DATA, then let a second executor take over; the intent's final status."""
    prepare_home(home, mail_config(connector) + "\n[executor]\nlease_ttl = 6\n")
    env = farmhand_env(home)
    payload = json.dumps(PAYLOAD)
    cli(env, "submit", "email.send", "--key", "crash-1", "--account", "mail", "--payload", payload)
    server.hold_data()
    first = ExecutorProcess(env, home / "ex-1.log", "--id", "ex-1")
    try:
        assert server.wait_for(1, timeout=30), (home / "ex-1.log").read_text()
    finally:
        first.kill()
    server.release.set()  # the reply goes to a dead connection
    second = ExecutorProcess(env, home / "ex-2.log", "--id", "ex-2", "--drain")
    try:
        assert second.wait(60) == 0, (home / "ex-2.log").read_text()
    finally:
        if second.popen.poll() is None:
            second.kill()
    status: dict[str, Any] = json.loads(cli(env, "status", "crash-1", "--json"))
    return status


@pytest.mark.timeout(120)
def test_crash_after_data_ends_unknown_and_is_never_resent(
    tmp_path: Path, smtp: SmtpServer, cert: tuple[Path, Path]
) -> None:
    status = crash_after_data(tmp_path / "home", smtp, settings_for(smtp, cert))
    assert status["state"] == "unknown"
    (receipt,) = status["receipts"]
    assert receipt["source"] == ReceiptSource.RECONCILE
    assert receipt["executor"] == "ex-2"
    assert "no IMAP settings" in receipt["error"]
    assert message_id("crash-1", SENDER) in receipt["error"]
    # exactly once: the interrupted attempt reached the server, nothing was sent again
    messages = smtp.messages()
    assert len(messages) == 1
    assert messages[0].message["Message-ID"] == message_id("crash-1", SENDER)


@pytest.mark.timeout(120)
def test_crash_after_data_is_reconciled_through_imap(
    tmp_path: Path, filing_smtp: SmtpServer, cert: tuple[Path, Path], dovecot: Dovecot
) -> None:
    connector = settings_for(filing_smtp, cert)
    connector["imap"] = {"host": "127.0.0.1", "port": dovecot.port, "security": "starttls"}
    status = crash_after_data(tmp_path / "home", filing_smtp, connector)
    assert status["state"] == "succeeded"
    (receipt,) = status["receipts"]
    assert receipt["source"] == ReceiptSource.RECONCILE
    assert receipt["external_id"] == message_id("crash-1", SENDER)
    assert receipt["detail"] == {"found_in": "Sent"}
    assert len(filing_smtp.messages()) == 1


# -- reconcile against IMAP --------------------------------------------------------------------


def attempt() -> Attempt:
    return Attempt(
        intent_id="in_mail",
        attempt=1,
        executor="ex-gone",
        fencing_token=1,
        started_at=datetime.now(UTC),
    )


async def test_reconcile_finds_a_filed_copy(
    filing_smtp: SmtpServer, cert: tuple[Path, Path], dovecot: Dovecot
) -> None:
    imap = {"host": "127.0.0.1", "port": dovecot.port, "security": "starttls"}
    account = account_for(filing_smtp, cert, imap=imap)
    call = make_call(account, key="reconcile-found")
    assert isinstance(await EmailConnector().execute(call), Succeeded)
    found = await EmailConnector().reconcile(call, attempt())
    assert isinstance(found, Succeeded)
    assert found.external_id == message_id("reconcile-found", SENDER)


async def test_reconcile_without_a_copy_stays_uncertain(
    smtp: SmtpServer, cert: tuple[Path, Path], dovecot: Dovecot
) -> None:
    imap = {"host": "127.0.0.1", "port": dovecot.port, "security": "starttls"}
    call = make_call(account_for(smtp, cert, imap=imap), key="reconcile-missing")
    found = await EmailConnector().reconcile(call, attempt())
    assert isinstance(found, Uncertain)
    assert "is not in IMAP folder 'Sent'" in found.error


async def test_reconcile_with_a_missing_folder_stays_uncertain(
    smtp: SmtpServer, cert: tuple[Path, Path], dovecot: Dovecot
) -> None:
    imap = {"host": "127.0.0.1", "port": dovecot.port, "security": "starttls", "folder": "Nope"}
    call = make_call(account_for(smtp, cert, imap=imap), key="reconcile-nofolder")
    found = await EmailConnector().reconcile(call, attempt())
    assert isinstance(found, Uncertain)
    assert "cannot look for Message-ID" in found.error
    assert "Nope" in found.error


async def test_reconcile_with_a_wrong_password_is_uncertain_and_redacted(
    smtp: SmtpServer, cert: tuple[Path, Path], dovecot: Dovecot
) -> None:
    imap = {"host": "127.0.0.1", "port": dovecot.port, "security": "starttls"}
    call = make_call(account_for(smtp, cert, imap=imap), password="wrong-pw-77")
    found = await EmailConnector().reconcile(call, attempt())
    assert isinstance(found, Uncertain)
    assert "wrong-pw-77" not in found.error


def test_never_idempotent(smtp: SmtpServer, cert: tuple[Path, Path]) -> None:
    account = dataclasses.replace(account_for(smtp, cert), honours_idempotency_key=True)
    assert not EmailConnector().idempotent(account)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"from": "not an address"}, "from"),
        ({"to": ["a@b"]}, "fully qualified domain"),
        ({"to": ["x@example.com, y@example.com"]}, "not one valid email address"),
        ({"to": [], "cc": [], "bcc": []}, "at least one of to, cc, bcc"),
        ({"subject": "hi\r\nBcc: victim@example.com"}, "line breaks"),
        ({"headers": {"Message-ID": "<mine@x>"}}, "written by farmhand"),
        ({"headers": {"Content-Type": "text/html"}}, "written by farmhand"),
        ({"headers": {"Bad Name": "x"}}, "not a header name"),
        ({"headers": {"X-A": "1\nBcc: victim@example.com"}}, "line breaks"),
        ({"to": ["é@example.com"]}, "email address"),
        ({"to": [f"u{i}@example.com" for i in range(101)]}, "at most 100"),
        ({"body": "x"}, "body"),
    ],
)
def test_invalid_payloads_are_refused(change: dict[str, Any], fragment: str) -> None:
    payload = {**PAYLOAD, **change}
    with pytest.raises(InvalidInput) as refused:
        EmailConnector().validate(payload, "k")
    assert str(refused.value).startswith("email.send payload")
    assert fragment in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("connector", "fragment"),
    [
        ({}, "has no [accounts.mail.connector]"),
        ({"port": 25}, "host"),
        ({"host": "smtp.example.org", "security": "ssl"}, "security"),
        ({"host": "smtp.example.org", "security": "plain", "username": "u"}, "in clear"),
        (
            {
                "host": "smtp.example.org",
                "imap": {"host": "x", "security": "plain"},
                "username": "u",
            },
            "in clear",
        ),
        ({"host": "smtp.example.org", "verify": False}, "verify"),
    ],
)
def test_bad_settings_are_named(connector: dict[str, Any], fragment: str) -> None:
    account = AccountConfig(name="mail", connector=connector)
    with pytest.raises(InvalidInput) as bad:
        EmailSettings.of(account)
    assert fragment in str(bad.value)


def test_sender_allow_list() -> None:
    account = AccountConfig(
        name="mail",
        connector={"host": "smtp.example.org", "senders": ["ops@example.com", "@example.org"]},
    )
    connector = EmailConnector()
    connector.validate_for(PAYLOAD, account)  # bot@example.org: the domain is allowed
    connector.validate_for({**PAYLOAD, "from": "ops@example.com"}, account)
    with pytest.raises(InvalidInput, match=r"may not send as eve@example\.com"):
        connector.validate_for({**PAYLOAD, "from": "eve@example.com"}, account)


def test_submit_checks_the_account_settings(tmp_home: Path) -> None:
    prepare_home(tmp_home, mail_config({"host": "smtp.example.org", "senders": ["@example.com"]}))
    done = subprocess.run(
        [*SUBMIT, "--key", "k", "--account", "mail", "--payload", json.dumps(PAYLOAD)],
        env=farmhand_env(tmp_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "may not send as bot@example.org" in done.stderr


def test_schema_email_send(tmp_home: Path) -> None:
    schema = json.loads(cli(farmhand_env(tmp_home), "schema", "email.send"))
    assert schema["additionalProperties"] is False
    assert {"from", "to", "cc", "bcc", "subject", "text", "html", "headers"} <= set(
        schema["properties"]
    )
    assert set(schema["required"]) == {"from", "subject", "text"}
    names = json.loads(cli(farmhand_env(tmp_home), "schema", "--list"))
    assert {"email.send", "command.run", "intent"} <= set(names)
