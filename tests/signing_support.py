"""Helpers shared by the signature tests."""

from __future__ import annotations

from typing import Any

import pytest

from farmhand.contracts import Contract
from farmhand.signing import SignatureError, Verifier, verify


def reason(record: Contract, verifier: Verifier, **kwargs: Any) -> str:
    """Why ``verify`` refuses ``record``: a one-line SignatureError with exit code 8."""
    with pytest.raises(SignatureError) as caught:
        verify(record, verifier, **kwargs)
    assert caught.value.exit_code == 8
    assert "\n" not in str(caught.value)
    return str(caught.value)
