"""Canonical JSON bytes and hashes: what gets signed, hashed and compared.

Keys are sorted, no insignificant whitespace, UTF-8, and NaN/Infinity are refused,
so two equal JSON values always produce the same bytes and the same hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from farmhand.errors import InvalidInput

# json.dumps with these options builds a new encoder on every call, a good part of the
# cost for a record of a few hundred bytes; a shared one writes the same bytes
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> bytes:
    """Return the canonical JSON encoding of ``value`` as bytes."""
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            "value contains a lone UTF-16 surrogate (e.g. \\ud800), which is not valid "
            "Unicode; send well-formed text"
        ) from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"value is not canonical JSON: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def bytes_hash(data: bytes) -> str:
    """Return ``sha256:<hex>`` of canonical JSON bytes already encoded."""
    return "sha256:" + sha256_hex(data)


def payload_hash(payload: Any) -> str:
    """Return ``sha256:<hex>`` of the canonical JSON of ``payload``."""
    return bytes_hash(canonical_json(payload))
