"""One exception hierarchy for farmhand.

Every error carries a message a user can act on (what is wrong and what to do)
and the exit code the CLI uses for it. The codes are part of the CLI contract.
"""

from __future__ import annotations


class FarmhandError(Exception):
    """Base class: something farmhand could not do. Exit code 1."""

    exit_code = 1


class InvalidInput(FarmhandError):
    """The caller's input is malformed or not allowed. Exit code 2."""

    exit_code = 2


class SchemaVersionError(InvalidInput):
    """A contract carries a schema_version whose major this farmhand cannot read."""


class UnknownKind(InvalidInput):
    """No connector is registered for the requested kind."""


class ConflictError(FarmhandError):
    """The idempotency key is already used for a different request. Exit code 3."""

    exit_code = 3


class NotFound(FarmhandError):
    """No intent (or other record) matches the reference given. Exit code 4."""

    exit_code = 4


class StoreError(FarmhandError):
    """The store cannot be opened, read or written. Exit code 5."""

    exit_code = 5


class InvalidTransition(FarmhandError):
    """The intent is not in a state that allows the requested change. Exit code 6."""

    exit_code = 6


class Forbidden(FarmhandError):
    """The policy does not allow this agent to request this. Exit code 7."""

    exit_code = 7


class PolicyMissing(FarmhandError):
    """No policy is configured, so an executor will not act. Exit code 7."""

    exit_code = 7


class LeaseLost(FarmhandError):
    """The lease was taken over (fencing token no longer current)."""
