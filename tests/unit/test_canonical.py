"""Canonical JSON: one byte string (and hash) per JSON value."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farmhand.canonical import canonical_json, payload_hash, sha256_hex
from farmhand.errors import InvalidInput

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def test_keys_sorted_and_no_whitespace() -> None:
    value = {"b": 1, "a": [1, 2, {"d": None, "c": True}]}
    assert canonical_json(value) == b'{"a":[1,2,{"c":true,"d":null}],"b":1}'


def test_unicode_is_utf8_not_escaped() -> None:
    assert canonical_json({"name": "Zoë ☃"}) == '{"name":"Zoë ☃"}'.encode()


def test_key_order_does_not_change_bytes_or_hash() -> None:
    first = {"x": 1, "y": {"p": [1, "two"], "q": None}}
    second = {"y": {"q": None, "p": [1, "two"]}, "x": 1}
    assert canonical_json(first) == canonical_json(second)
    assert payload_hash(first) == payload_hash(second)


def test_different_values_hash_differently() -> None:
    assert payload_hash({"a": 1}) != payload_hash({"a": 2})
    assert payload_hash({"a": 1}) != payload_hash({"a": "1"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_refused(bad: float) -> None:
    with pytest.raises(InvalidInput, match="not canonical JSON"):
        canonical_json({"v": bad})


@pytest.mark.parametrize("bad", [{"v": object()}, {"v": {1, 2}}, {"v": b"bytes"}])
def test_non_json_values_refused(bad: Any) -> None:
    with pytest.raises(InvalidInput, match="not canonical JSON"):
        canonical_json(bad)


def test_sha256_hex_known_vector() -> None:
    assert sha256_hex(b"") == ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_payload_hash_format() -> None:
    value = {"to": "ops@example.com"}
    digest = payload_hash(value)
    assert digest == "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()
    prefix, _, hex_part = digest.partition(":")
    assert prefix == "sha256"
    assert len(hex_part) == 64
    assert hex_part == hex_part.lower()
    int(hex_part, 16)


@given(json_values)
def test_canonical_round_trip_is_stable(value: Any) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded
    assert payload_hash(json.loads(encoded)) == payload_hash(value)


@given(st.dictionaries(st.text(), st.integers(), max_size=8))
def test_insertion_order_is_irrelevant(value: dict[str, int]) -> None:
    reversed_value = dict(reversed(list(value.items())))
    assert canonical_json(reversed_value) == canonical_json(value)


def test_lone_surrogate_refused_as_invalid_input() -> None:
    value = json.loads('{"text": "\\ud800"}')
    with pytest.raises(InvalidInput, match="lone UTF-16 surrogate"):
        canonical_json(value)
