"""``webhook.post`` against a real loopback sink: results, retry classes and Idempotency-Key."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from farmhand.canonical import payload_hash
from farmhand.config import AccountConfig
from farmhand.connectors.base import Call, Failed, Succeeded, Uncertain
from farmhand.connectors.webhook import WebhookConnector, parse_retry_after
from farmhand.contracts import Intent
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidInput
from farmhand.testing.sink import WebhookSink

_DEFAULT_BODY: dict[str, Any] = {"order": 42, "note": "ship it"}


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    with WebhookSink() as running:
        yield running


@pytest.fixture
async def connector() -> AsyncIterator[WebhookConnector]:
    webhook = WebhookConnector()
    yield webhook
    await webhook.aclose()


def build(payload: dict[str, Any], key: str = "order-42") -> Any:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]  # build_intent needs no store
    return coordinator.build_intent(SubmitRequest(kind="webhook.post", key=key, payload=payload))


def make_call(
    url: str,
    key: str = "order-42",
    *,
    method: str = "POST",
    body: Any = _DEFAULT_BODY,
    honours: bool = False,
    timeout: float = 5.0,
    attempt: int = 1,
) -> Call:
    intent = build({"url": url, "method": method, "json": body}, key)
    account = (
        AccountConfig(name="acme", honours_idempotency_key=True)
        if honours
        else AccountConfig(name="default")
    )
    return Call(intent=intent, attempt=attempt, account=account, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- success and idempotency ------------------------------------------------------------------


async def test_2xx_succeeds_with_id_and_url_from_the_response(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    result = await connector.execute(make_call(f"{sink.url}/ok"))
    assert isinstance(result, Succeeded)
    effect = sink.effects()["order-42"]
    assert effect.status == 201
    assert effect.body == _DEFAULT_BODY
    assert effect.method == "POST"
    assert result.external_id is not None
    assert result.external_id.startswith("eff-")
    assert result.url == f"{sink.url}/effects/{result.external_id}"
    assert result.detail == {"status": 201}


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_method_and_body_reach_the_target(
    sink: WebhookSink, connector: WebhookConnector, method: str
) -> None:
    result = await connector.execute(make_call(f"{sink.url}/ok", method=method, body=[1, "two"]))
    assert isinstance(result, Succeeded)
    (call,) = sink.calls()
    assert (call.method, call.body, call.path) == (method, [1, "two"], "/ok")


@pytest.mark.parametrize(
    "key",
    [
        "order-42",
        "agent-7:order/42?retry=1&x=%20",
        "K" * 255,
        'with inner  spaces and "quotes" and ;,=',
    ],
)
async def test_idempotency_key_header_is_the_intent_key_unchanged(
    sink: WebhookSink, connector: WebhookConnector, key: str
) -> None:
    result = await connector.execute(make_call(f"{sink.url}/ok", key))
    assert isinstance(result, Succeeded)
    assert [call.key for call in sink.calls()] == [key]


async def test_repeats_of_one_key_make_one_effect_with_one_id(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    results = [await connector.execute(make_call(f"{sink.url}/ok", attempt=n)) for n in range(1, 4)]
    assert all(isinstance(r, Succeeded) for r in results)
    assert len({r.external_id for r in results if isinstance(r, Succeeded)}) == 1
    assert len(sink.effects()) == 1
    assert sink.repeated_calls() == 2


async def test_concurrent_calls_share_the_pool_and_keep_keys_apart(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    calls = [make_call(f"{sink.url}/ok", f"key-{i % 10}") for i in range(40)]
    results = await asyncio.gather(*(connector.execute(call) for call in calls))
    assert all(isinstance(r, Succeeded) for r in results)
    assert len(sink.effects()) == 10
    assert sink.repeated_calls() == 30
    by_key: dict[str, set[str | None]] = {}
    for call, result in zip(calls, results, strict=True):
        assert isinstance(result, Succeeded)
        by_key.setdefault(call.intent.key, set()).add(result.external_id)
    assert all(len(ids) == 1 for ids in by_key.values())
    assert len(set().union(*by_key.values())) == 10


# -- failures -----------------------------------------------------------------------------------


async def test_500_is_retryable(sink: WebhookSink, connector: WebhookConnector) -> None:
    result = await connector.execute(make_call(f"{sink.url}/fail"))
    assert isinstance(result, Failed)
    assert result.retryable
    assert result.retry_after is None
    assert "HTTP 500" in result.error
    assert sink.effects() == {}


async def test_503_then_success_after_retries(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    url = f"{sink.url}/flaky?fail_times=2"
    first = await connector.execute(make_call(url, attempt=1))
    second = await connector.execute(make_call(url, attempt=2))
    third = await connector.execute(make_call(url, attempt=3))
    assert isinstance(first, Failed)
    assert first.retryable
    assert isinstance(second, Failed)
    assert second.retryable
    assert isinstance(third, Succeeded)
    assert len(sink.effects()) == 1


async def test_429_is_retryable_with_retry_after(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    result = await connector.execute(make_call(f"{sink.url}/ratelimit?retry_after=7"))
    assert isinstance(result, Failed)
    assert result.retryable
    assert result.retry_after == 7.0
    assert "HTTP 429" in result.error


async def test_400_is_permanent(sink: WebhookSink, connector: WebhookConnector) -> None:
    result = await connector.execute(make_call(f"{sink.url}/reject"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "HTTP 400" in result.error
    assert "simulated rejection" in result.error  # a body excerpt helps the operator


async def test_connection_refused_is_retryable(connector: WebhookConnector) -> None:
    url = f"http://127.0.0.1:{closed_port()}/ok"
    result = await connector.execute(make_call(url))
    assert isinstance(result, Failed)
    assert result.retryable
    assert "cannot connect" in result.error


async def test_read_timeout_after_sending_is_uncertain_by_default(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    result = await connector.execute(make_call(f"{sink.url}/slow?ms=600", timeout=0.2))
    assert isinstance(result, Uncertain)
    assert "may have been sent" in result.error
    # and it was: the sink made the effect after the client gave up
    assert sink.wait_for_calls(1, timeout=5.0)
    assert set(sink.effects()) == {"order-42"}


async def test_read_timeout_is_retryable_when_the_account_honours_keys(
    sink: WebhookSink, connector: WebhookConnector
) -> None:
    url = f"{sink.url}/slow?ms=600"
    result = await connector.execute(make_call(url, honours=True, timeout=0.2))
    assert isinstance(result, Failed)
    assert result.retryable
    assert sink.wait_for_calls(1, timeout=5.0)
    effect = sink.effects()["order-42"]
    # the retry is safe: the target answers with the effect it already made
    retry = await connector.execute(make_call(url, honours=True, timeout=5.0, attempt=2))
    assert isinstance(retry, Succeeded)
    assert len(sink.effects()) == 1
    assert sink.repeated_calls() == 1
    assert retry.detail == {"status": effect.status}


def test_idempotent_follows_the_account() -> None:
    webhook = WebhookConnector()
    assert not webhook.idempotent(AccountConfig(name="default"))
    assert webhook.idempotent(AccountConfig(name="acme", honours_idempotency_key=True))


# -- payload validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"json": {"a": 1}}, "url"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "http://example.com/hook", "method": "GET"}, "method"),
        ({"url": "http://example.com/hook", "headers": {"Idempotency-Key": "mine"}}, "Idempotency"),
        ({"url": "http://example.com/hook", "headers": {"idempotency-KEY": "x"}}, "Idempotency"),
        ({"url": "http://example.com/hook", "body": {"a": 1}}, "body"),
        ({"url": "http://example.com/hook", "headers": {"X-N": 1}}, "headers"),
    ],
)
def test_invalid_payloads_raise_one_line_invalid_input(
    payload: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidInput) as direct:
        WebhookConnector().validate(payload, "key-1")
    with pytest.raises(InvalidInput) as via_coordinator:
        build(payload)
    for exc in (direct.value, via_coordinator.value):
        message = str(exc)
        assert "\n" not in message
        assert message.startswith("webhook.post payload")
        assert fragment in message
        assert exc.exit_code == 2


def test_valid_payload_passes() -> None:
    WebhookConnector().validate(
        {"url": "https://example.com/hook", "method": "PUT", "json": [1], "headers": {"X": "y"}},
        "key-1",
    )


# -- Retry-After ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), (" 5 ", 5.0), ("0", 0.0), (None, None), ("", None), ("soon", None)],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    # RFC 850 form, which recipients must also accept
    assert parse_retry_after("Tuesday, 14-Nov-23 22:14:00 GMT", now=now) == 40.0


def test_parse_retry_after_http_date_defaults_to_now() -> None:
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    value = parse_retry_after(later)
    assert value is not None
    assert 55.0 <= value <= 60.0


# -- keys that cannot travel in a header, odd Retry-After values --------------------------------


@pytest.mark.parametrize("key", [" padded ", "commande-café", "x-\u00a0-nbsp"])
async def test_unsendable_key_is_refused_not_uncertain(
    sink: WebhookSink, connector: WebhookConnector, key: str
) -> None:
    payload = {"url": f"{sink.url}/ok"}
    with pytest.raises(InvalidInput, match="Idempotency-Key header") as refused:
        Coordinator(store=None).build_intent(  # type: ignore[arg-type]
            SubmitRequest(kind="webhook.post", key=key, payload=payload)
        )
    assert "\n" not in str(refused.value)
    # if such an intent reached an executor anyway, it fails permanently without a call
    intent = Intent(
        id="in_unsendable",
        key=key,
        kind="webhook.post",
        payload=payload,
        payload_hash=payload_hash(payload),
        created_at=datetime.now(UTC),
    )
    call = Call(intent=intent, attempt=1, account=AccountConfig(name="default"), timeout=5.0)
    result = await connector.execute(call)
    assert isinstance(result, Failed)
    assert not result.retryable
    assert sink.calls() == []


def test_parse_retry_after_ignores_non_ascii_digits() -> None:
    assert parse_retry_after("²") is None


@pytest.fixture
def new_york_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("new_york_time")
def test_parse_retry_after_asctime_date_is_gmt() -> None:
    now = 784_111_777.0 - 30  # Sun, 06 Nov 1994 08:49:37 GMT, minus 30 s
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", now=now) == 30.0
