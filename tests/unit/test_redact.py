"""Redaction: raw, URL-encoded, base64 and JSON-escaped secret values become [redacted:NAME],
in text, in nested data, in log records (with exception text) and in webhook errors."""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest

from farmhand.config import AccountConfig
from farmhand.connectors import Call, Failed
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.redact import (
    RedactingFilter,
    Redactor,
    forms,
    install_excepthook,
    install_log_filter,
)
from farmhand.secrets import Secret
from farmhand.testing.sink import WebhookSink

VALUE = "CANARY-0123456789abcdef"
ODD = "p@ss word/+=&?ü"  # every character URL encoding, base64 or JSON may change


def redactor(*pairs: tuple[str, str]) -> Redactor:
    return Redactor(pairs or [("TOKEN", VALUE)])


def b64(text: str, *, urlsafe: bool = False) -> str:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(text.encode("utf-8")).decode("ascii")


@pytest.mark.parametrize(
    "shown",
    [
        VALUE,
        quote(ODD, safe=""),
        quote(ODD),
        quote_plus(ODD),
        quote(ODD, safe="").lower(),  # %2f as well as %2F (the letters here are all escapes)
        b64(ODD),
        b64(ODD, urlsafe=True),
        b64(ODD).rstrip("="),
        json.dumps(ODD)[1:-1],
        ODD,
    ],
)
def test_every_form_is_redacted(shown: str) -> None:
    text = f"before {shown} after"
    out = Redactor([("TOKEN", VALUE), ("ODD", ODD)]).text(text)
    assert shown not in out
    assert out.startswith("before [redacted:")
    assert out.endswith("] after")


def test_every_occurrence_is_replaced_with_the_name() -> None:
    text = f"{VALUE}{VALUE} and {VALUE}"
    assert redactor().text(text) == "[redacted:TOKEN][redacted:TOKEN] and [redacted:TOKEN]"


def test_base64_inside_a_longer_encoding_is_redacted() -> None:
    # a provider echoing HTTP Basic credentials: base64("user:<secret>")
    for prefix in ("", "u", "us", "user:"):
        encoded = b64(prefix + VALUE)
        out = redactor().text(f"auth={encoded}")
        assert "[redacted:TOKEN]" in out, prefix
        assert b64(VALUE) not in out
        # what is left cannot be decoded back to the value
        assert VALUE not in out


def test_short_values_are_still_redacted() -> None:
    assert Redactor([("PIN", "ab1")]).text("x ab1 y ab1") == "x [redacted:PIN] y [redacted:PIN]"
    assert Redactor([("C", "z")]).text("zoo") == "[redacted:C]oo"
    # short values get no unpadded base64 form: redacting two letters everywhere is enough harm
    assert Redactor([("PIN", "ab1")]).text("YWIx YWIx") == "[redacted:PIN] [redacted:PIN]"


def test_the_longest_secret_wins_when_one_contains_another() -> None:
    out = Redactor([("SHORT", "abcd"), ("LONG", "abcd-efgh")]).text("abcd-efgh abcd")
    assert out == "[redacted:LONG] [redacted:SHORT]"


def test_a_name_containing_its_value_is_not_shown() -> None:
    out = Redactor([("tok", "tok")]).text("tok")
    assert out == "[redacted]"


def test_empty_values_and_an_empty_redactor_change_nothing() -> None:
    assert not Redactor()
    assert not Redactor([("EMPTY", "")])
    assert Redactor().text(VALUE) == VALUE
    data = {"a": [VALUE]}
    assert Redactor().value(data) is data


def test_nested_data_is_redacted_keys_and_values() -> None:
    data = {"status": 500, VALUE: [f"x{VALUE}", ("t", VALUE)], "n": None, "ok": True}
    out = redactor().value(data)
    assert out == {
        "status": 500,
        "[redacted:TOKEN]": ["x[redacted:TOKEN]", ("t", "[redacted:TOKEN]")],
        "n": None,
        "ok": True,
    }
    assert redactor().optional(None) is None


def test_forms_include_the_raw_value() -> None:
    assert VALUE in forms(VALUE)
    assert "" not in forms(VALUE)


# -- logging ------------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger tree of its own with one handler writing to a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    parent = logging.getLogger("redact-test")
    parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    parent.propagate = False
    try:
        yield parent, stream
    finally:
        parent.removeHandler(handler)
        parent.propagate = True


def test_log_filter_redacts_messages_args_exceptions_and_stacks(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    parent, stream = captured
    install_log_filter(redactor(), parent)
    install_log_filter(redactor(), parent)  # idempotent: one filter per handler
    assert sum(isinstance(f, RedactingFilter) for f in parent.handlers[0].filters) == 1
    child = logging.getLogger("redact-test.child")  # records propagate to the parent's handler
    child.info("token is %s", VALUE)
    child.warning(f"inline {VALUE}")
    child.info("encoded %s", quote(VALUE + "/", safe=""))
    try:
        raise RuntimeError(f"provider said {VALUE}")
    except RuntimeError:
        child.exception("call failed for %r", {"auth": b64(VALUE)})
    child.info("with stack", stack_info=True, extra={"unused": VALUE})
    text = stream.getvalue()
    assert VALUE not in text
    assert b64(VALUE) not in text
    assert "RuntimeError: provider said [redacted:TOKEN]" in text
    assert text.count("[redacted:TOKEN]") >= 5
    assert "Stack (most recent call last)" in text


def test_log_filter_survives_a_bad_format_string(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    parent, stream = captured
    install_log_filter(redactor(), parent)
    parent.info("%d items", VALUE)
    assert VALUE not in stream.getvalue()


def test_no_filter_without_secrets(captured: tuple[logging.Logger, io.StringIO]) -> None:
    parent, _ = captured
    install_log_filter(Redactor(), parent)
    assert parent.handlers[0].filters == []


def test_uncaught_tracebacks_are_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    original = sys.excepthook
    monkeypatch.setattr(sys, "excepthook", original)
    install_excepthook(Redactor())  # nothing to redact: the hook stays as it was
    assert sys.excepthook is original
    install_excepthook(redactor())
    assert sys.excepthook is not original
    try:
        raise ValueError(f"bad {VALUE}")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "ValueError: bad [redacted:TOKEN]" in err
    assert VALUE not in err


# -- a provider that echoes the credential -----------------------------------------------------


def call_to(url: str, secret: Secret) -> Call:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]  # build_intent needs no store
    intent = coordinator.build_intent(
        SubmitRequest(kind="webhook.post", key="k-1", payload={"url": url}, account="billing")
    )
    account = AccountConfig(name="billing", secret=secret.name)
    return Call(intent=intent, attempt=1, account=account, timeout=5.0, secret=secret)


@pytest.mark.parametrize("value", [VALUE, "CANARY-" + "f" * 300, "ab"])
async def test_webhook_error_from_an_echoing_provider_is_redacted(value: str) -> None:
    from farmhand.connectors.webhook import WebhookConnector

    connector = WebhookConnector()
    try:
        with WebhookSink() as sink:
            result = await connector.execute(call_to(f"{sink.url}/echo-auth", Secret("T", value)))
            (call,) = sink.calls()
    finally:
        await connector.aclose()
    assert call.authorization == f"Bearer {value}"  # it really was sent
    assert call.status == 500
    assert isinstance(result, Failed)
    assert result.retryable
    assert "[redacted:T]" in result.error
    # not even a piece of a long value survives the excerpt's cut
    for leaked in (value, value[:12], b64(value), quote(value, safe="")):
        if len(leaked) >= 4:
            assert leaked not in result.error
