"""Sortable unique identifiers (ULID layout: 48-bit milliseconds + 80 random bits)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
#: every pair of base32 digits, indexed by a 10-bit value: 13 lookups spell 26 digits
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def new_id(prefix: str) -> str:
    """Return ``prefix_`` followed by 26 base32 characters that sort by creation time."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    pairs = _PAIRS
    digits = "".join([pairs[(value >> shift) & 0x3FF] for shift in range(120, -10, -10)])
    return f"{prefix}_{digits}"
