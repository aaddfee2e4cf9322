"""The connector interface: one connector per kind of side effect.

A connector validates payloads, performs one call per attempt, says whether repeating a
call is safe for an account, and reconciles an attempt whose outcome was lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    # annotations only: submitting an intent never loads the executor's secrets module
    from pydantic import BaseModel, ValidationError

    from farmhand.config import AccountConfig
    from farmhand.contracts import Attempt, Intent
    from farmhand.secrets import Secret


@dataclass(frozen=True, slots=True)
class Call:
    """Everything a connector needs for one attempt."""

    intent: Intent
    attempt: int
    account: AccountConfig
    #: seconds the call may take before the executor gives up on it
    timeout: float
    #: the account's credential, from the executor's secret store (None: the account names
    #: none). Its repr shows only the name; ``secret.reveal()`` gives the value.
    secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The effect happened (or was found to have happened)."""

    external_id: str | None = None
    url: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failed:
    """The effect did not happen."""

    error: str
    retryable: bool
    #: seconds the provider asked us to wait (Retry-After)
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Uncertain:
    """The effect may or may not have happened; repeating the call could duplicate it."""

    error: str


@dataclass(frozen=True, slots=True)
class Absent:
    """Reconciliation: the effect did not happen, or repeating it is harmless."""

    reason: str


Result = Succeeded | Failed | Uncertain
Reconciled = Succeeded | Absent | Uncertain


M = TypeVar("M", bound="BaseModel")


def first_error(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``field.path: message`` (one line)."""
    first = exc.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {message}" if where else message


def parse(model: type[M], data: Mapping[str, Any], what: str) -> M:
    """``data`` validated as ``model``; else InvalidInput ``"<what>: <field>: <problem>"``."""
    from pydantic import ValidationError

    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidInput(f"{what}: {first_error(exc)}") from None


def settings_where(account: AccountConfig, kind: str) -> str:
    """Where an account's settings for ``kind`` live, for error messages."""
    return f"[accounts.{account.name}.connector] for {kind}"


class Connector:
    """Base class for connectors. Subclasses set ``kind`` and implement :meth:`execute`."""

    kind: ClassVar[str]
    #: the pydantic model of this kind's payload, published by ``farmhand schema <kind>``
    #: (None: the connector documents its payload in prose only)
    payload_model: ClassVar[type[BaseModel] | None] = None

    def validate(self, payload: dict[str, Any], key: str) -> None:
        """Raise :class:`farmhand.errors.InvalidInput` if this payload and idempotency key
        cannot be executed (checked at submit and again before every attempt)."""

    def validate_for(self, payload: dict[str, Any], account: AccountConfig) -> None:
        """Raise :class:`farmhand.errors.InvalidInput` if ``account``'s connector settings
        do not allow this (already validated) payload, e.g. a command outside an allow-list.

        Checked before every attempt, and at submit when the submitting host's settings
        configure the account.
        """

    def idempotent(self, account: AccountConfig) -> bool:
        """Whether repeating a call for ``account`` can never duplicate the effect."""
        return False

    async def execute(self, call: Call) -> Result:
        """Perform the side effect once."""
        raise NotImplementedError

    async def reconcile(self, call: Call, attempt: Attempt) -> Reconciled:
        """Decide the outcome of ``attempt``, which started but left no receipt.

        The default knows nothing about the target: a repeat is safe only if the
        connector is idempotent for this account; otherwise the outcome stays unknown.
        """
        if self.idempotent(call.account):
            return Absent(f"{self.kind} is idempotent for account {call.account.name}; resending")
        return Uncertain(
            f"attempt {attempt.attempt} by {attempt.executor} was interrupted mid-call and "
            f"{self.kind} cannot look up whether it took effect for account "
            f"{call.account.name}; check the target, then run farmhand resolve"
        )

    async def aclose(self) -> None:
        """Release clients and connections."""
