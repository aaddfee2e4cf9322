"""Wire contracts: frozen, versioned, integrity-checked, with a JSON Schema each."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from farmhand.canonical import payload_hash
from farmhand.contracts import (
    MAX_KEY_LENGTH,
    SCHEMA_VERSION,
    SCHEMAS,
    GateRule,
    Intent,
    Outcome,
    Receipt,
    check_schema_version,
)
from farmhand.errors import InvalidInput, SchemaVersionError

NOW = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)


def intent_data(**overrides: Any) -> dict[str, Any]:
    payload = overrides.pop("payload", {"to": "ops@example.com", "n": 1})
    data: dict[str, Any] = {
        "id": "in_01",
        "key": "order-1",
        "kind": "email.send",
        "payload": payload,
        "payload_hash": payload_hash(payload),
        "created_at": NOW,
    }
    data.update(overrides)
    return data


def test_valid_intent_has_defaults() -> None:
    intent = Intent.model_validate(intent_data())
    assert intent.schema_version == SCHEMA_VERSION
    assert intent.account == "default"
    assert intent.agent == "local"
    assert intent.max_attempts == 5


def test_intent_is_frozen() -> None:
    intent = Intent.model_validate(intent_data())
    with pytest.raises(ValidationError, match="frozen"):
        intent.key = "other"  # type: ignore[misc]


def test_receipt_is_frozen() -> None:
    receipt = Receipt(
        id="rc_1",
        intent_id="in_1",
        attempt=1,
        outcome=Outcome.SUCCEEDED,
        executor="ex_1",
        fencing_token=1,
        finished_at=NOW,
    )
    with pytest.raises(ValidationError, match="frozen"):
        receipt.outcome = Outcome.FAILED  # type: ignore[misc]


def test_json_round_trip() -> None:
    intent = Intent.model_validate(intent_data(not_before=NOW, expires_at=NOW + timedelta(1)))
    assert Intent.model_validate_json(intent.model_dump_json()) == intent


@pytest.mark.parametrize("version", ["2.0", "2", "10.3"])
def test_newer_major_refused_naming_the_version(version: str) -> None:
    with pytest.raises(SchemaVersionError, match=f"schema_version {version} has major"):
        Intent.model_validate(intent_data(schema_version=version))


def test_newer_major_refused_from_json() -> None:
    text = json.dumps(intent_data(schema_version="2.0"), default=str)
    with pytest.raises(SchemaVersionError, match=r"intent: schema_version 2\.0"):
        Intent.model_validate_json(text)


def test_schema_version_error_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        check_schema_version("receipt", "2.1")


@pytest.mark.parametrize("version", ["x.1", "", "v1.0", "-1.0"])
def test_malformed_schema_version_refused(version: str) -> None:
    with pytest.raises(SchemaVersionError, match=r"not MAJOR\.MINOR"):
        Intent.model_validate(intent_data(schema_version=version))


def test_newer_minor_accepted_and_unknown_fields_ignored() -> None:
    intent = Intent.model_validate(intent_data(schema_version="1.7", from_the_future=True))
    assert intent.schema_version == "1.7"
    assert not hasattr(intent, "from_the_future")


def test_payload_hash_must_match_payload() -> None:
    data = intent_data()
    data["payload_hash"] = payload_hash({"something": "else"})
    with pytest.raises(ValidationError, match="does not match payload"):
        Intent.model_validate(data)


def test_payload_change_with_old_hash_refused() -> None:
    data = intent_data()
    data["payload"] = {**data["payload"], "n": 2}
    with pytest.raises(ValidationError, match="does not match payload"):
        Intent.model_validate(data)


def test_key_of_max_length_accepted() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert MAX_KEY_LENGTH == 255
    assert Intent.model_validate(intent_data(key=key)).key == key


def test_key_over_max_length_refused() -> None:
    with pytest.raises(ValidationError, match="256 characters; the limit is 255"):
        Intent.model_validate(intent_data(key="k" * (MAX_KEY_LENGTH + 1)))


@pytest.mark.parametrize("key", ["a\nb", "tab\there", "nul\x00", "del\x7f", "\x1b[31m"])
def test_key_with_control_characters_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="control characters"):
        Intent.model_validate(intent_data(key=key))


def test_empty_key_refused() -> None:
    with pytest.raises(ValidationError, match="empty"):
        Intent.model_validate(intent_data(key=""))


def test_unicode_key_accepted() -> None:
    assert Intent.model_validate(intent_data(key="commande-é-☃")).key == "commande-é-☃"


@pytest.mark.parametrize("kind", ["Email.send", "email..send", "1email", "email-send", ""])
def test_bad_kind_refused(kind: str) -> None:
    with pytest.raises(ValidationError):
        Intent.model_validate(intent_data(kind=kind))


@pytest.mark.parametrize("max_attempts", [0, 101])
def test_max_attempts_bounds(max_attempts: int) -> None:
    with pytest.raises(ValidationError):
        Intent.model_validate(intent_data(max_attempts=max_attempts))


def test_expiry_must_follow_not_before() -> None:
    with pytest.raises(ValidationError, match="expires_at must be later than not_before"):
        Intent.model_validate(intent_data(not_before=NOW, expires_at=NOW))


def test_gate_scope() -> None:
    rule = GateRule(kind="email.send", open=False, actor="ops", changed_at=NOW)
    assert rule.scope == "kind=email.send account=*"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_for_every_contract(name: str) -> None:
    model = SCHEMAS[name]
    assert model.contract_name == name
    schema = model.model_json_schema()
    json.dumps(schema)  # serialisable as published
    assert schema["type"] == "object"
    assert "schema_version" in schema["properties"]
    assert schema["properties"]["schema_version"]["default"] == SCHEMA_VERSION


def test_schemas_cover_every_contract() -> None:
    assert set(SCHEMAS) == {
        "intent",
        "intent_status",
        "receipt",
        "attempt",
        "lease",
        "audit_event",
        "gate",
        "approval",
    }
