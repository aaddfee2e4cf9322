"""Parsing of CLI values: times and JSON arguments."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from farmhand.errors import InvalidInput

_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str | None, option: str) -> datetime | None:
    """ISO 8601, epoch seconds, or ``+N[s|m|h|d]`` from now."""
    if value is None:
        return None
    text = value.strip()
    relative = _RELATIVE.match(text)
    if relative:
        seconds = float(relative.group(1)) * _UNITS[relative.group(2)]
        return datetime.fromtimestamp(time.time() + seconds, UTC)
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{option}: {value!r} is not a time; use ISO 8601 (2026-01-31T09:00:00Z), epoch "
            "seconds or +N[s|m|h|d]"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_json_arg(value: str, option: str) -> Any:
    """A JSON value given inline or as ``@file``."""
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"{option}: cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{option}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
