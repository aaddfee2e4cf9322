"""Identifiers: ULID layout in Crockford base32, sortable by creation time."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farmhand import ids


def spelled(value: int) -> str:
    """The reference spelling: 26 base32 digits, most significant first."""
    digits = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        digits.append(ids._ALPHABET[digit])
    return "".join(reversed(digits))


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_digits_spell_the_128_bit_value(value: int) -> None:
    got = "".join(ids._PAIRS[(value >> s) & 0x3FF] for s in range(120, -10, -10))
    assert got == spelled(value)


def test_shape_and_order_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = sorted(random.Random(7).sample(range(10**12, 2 * 10**12), 200))
    clock = iter(stamps)
    monkeypatch.setattr(ids.time, "time", lambda: (next(clock) + 0.5) / 1000)
    made = [ids.new_id("in") for _ in stamps]
    assert all(re.fullmatch(r"in_[0-7][0-9a-hjkmnp-tv-z]{25}", i) for i in made)
    assert made == sorted(made)
    assert [int(spelled_back(i[3:13]), 32) for i in made] == stamps


def spelled_back(digits: str) -> str:
    """Crockford digits as the digits int(..., 32) reads."""
    return "".join("0123456789abcdefghijklmnopqrstuv"[ids._ALPHABET.index(d)] for d in digits)
