"""Fixtures shared by the unit tests of keys and signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

from farmhand.keys import Keyring
from farmhand.signing import Signer


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    """An empty keyring in a temporary directory."""
    return Keyring(tmp_path / "keys")


@pytest.fixture
def signer(keyring: Keyring) -> Signer:
    """The signer of a new coordinator key in ``keyring``."""
    keyring.generate("coordinator")
    return keyring.signer("coordinator")
