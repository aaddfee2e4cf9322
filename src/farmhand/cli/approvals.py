"""``farmhand approve`` and ``farmhand reject``: an approver's signed decision."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from farmhand.cli.common import (
    ActorOption,
    JsonOption,
    ReasonOption,
    RefArgument,
    StoreOption,
    actor_name,
    emit_status,
    with_coordinator,
)

if TYPE_CHECKING:
    from farmhand.config import Settings
    from farmhand.contracts import IntentStatus
    from farmhand.coordinator import Coordinator


def _decide(
    ref: str, approve: bool, reason: str | None, store: str | None, as_json: bool, actor: str | None
) -> None:
    from farmhand.contracts import Decision
    from farmhand.keys import Keyring

    approver = actor_name(actor)

    async def run(co: Coordinator, settings: Settings) -> IntentStatus:
        signer = Keyring(settings.home / "keys").signer(approver)
        decision = Decision.APPROVE if approve else Decision.REJECT
        return await co.decide(ref, decision, signer, reason)

    emit_status(with_coordinator(store, run), as_json)


def approve(
    ref: RefArgument,
    reason: ReasonOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Approve an intent awaiting approval, signed with your approver key (--as NAME).

    The approval is bound to this intent, its exact payload hash and the rule's lifetime.
    Exit 7 if you are not an approver for it, 8 if you have no approver key.
    """
    _decide(ref, True, reason, store, as_json, actor)


def reject(
    ref: RefArgument,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")],
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Reject an intent awaiting approval; it ends `rejected` and never runs."""
    _decide(ref, False, reason, store, as_json, actor)
