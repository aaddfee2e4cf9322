"""The base every wire contract shares: frozen, JSON-serialisable, versioned."""

from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from farmhand.errors import SchemaVersionError

SCHEMA_MAJOR = 1
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.0"


def check_schema_version(name: str, version: object) -> None:
    """Refuse a ``schema_version`` whose major this farmhand cannot read."""
    text = str(version)
    major, _, _ = text.partition(".")
    if not major.isdigit():
        raise SchemaVersionError(
            f"{name}: schema_version {text!r} is not MAJOR.MINOR; this farmhand writes "
            f"{SCHEMA_VERSION}"
        )
    if int(major) != SCHEMA_MAJOR:
        raise SchemaVersionError(
            f"{name}: schema_version {text} has major {major}, this farmhand reads only major "
            f"{SCHEMA_MAJOR}; upgrade farmhand or re-create the record with schema_version "
            f"{SCHEMA_VERSION}"
        )


class Contract(BaseModel):
    """A versioned record on the wire. Unknown fields of a newer minor version are ignored."""

    # defer_build: schemas are built on first use, so a CLI call pays only for the
    # contracts it touches (the abstract base and unused contracts are never built)
    model_config = ConfigDict(frozen=True, extra="ignore", defer_build=True)
    contract_name: ClassVar[str] = "contract"

    schema_version: str = SCHEMA_VERSION

    @model_validator(mode="before")
    @classmethod
    def _check_version(cls, data: Any) -> Any:
        if isinstance(data, dict) and "schema_version" in data:
            check_schema_version(cls.contract_name, data["schema_version"])
        return data


def utc(ts: float) -> datetime:
    """Epoch seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


def epoch(dt: datetime) -> float:
    """An aware datetime (naive is taken as UTC) to epoch seconds."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
