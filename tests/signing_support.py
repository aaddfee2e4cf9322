"""Helpers shared by the signature tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from farmhand.contracts import Contract
from farmhand.signing import SignatureError, Verifier, verify

#: one change to each signed field of an intent but its payload (whose hash must change
#: with it): every one must break the signature
SIGNED_FIELD_CHANGES: list[tuple[str, Any]] = [
    ("id", "in_other"),
    ("key", "other-key"),
    ("kind", "webhook.post"),
    ("account", "billing"),
    ("agent", "mallory"),
    ("max_attempts", 100),
    ("created_at", datetime(2030, 1, 1, tzinfo=UTC)),
    ("not_before", datetime(2030, 1, 1, tzinfo=UTC)),
    ("expires_at", datetime(2031, 1, 1, tzinfo=UTC)),
    ("schema_version", "1.9"),
]


def reason(record: Contract, verifier: Verifier, **kwargs: Any) -> str:
    """Why ``verify`` refuses ``record``: a one-line SignatureError with exit code 8."""
    with pytest.raises(SignatureError) as caught:
        verify(record, verifier, **kwargs)
    assert caught.value.exit_code == 8
    assert "\n" not in str(caught.value)
    return str(caught.value)
