"""``farmhand dlq``: the dead-letter queue."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from farmhand.cli.common import (
    ActorOption,
    JsonOption,
    LimitOption,
    ReasonOption,
    StoreOption,
    actor_name,
    print_json,
    table,
    when,
    with_coordinator,
)
from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    from farmhand.config import Settings
    from farmhand.contracts import IntentStatus
    from farmhand.coordinator import Coordinator

app = typer.Typer(
    help="Dead letters: intents that cannot succeed, with every attempt's error.",
    no_args_is_help=True,
)


@app.command("list")
def list_(
    limit: LimitOption = 100,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, newest first, with their failure records."""
    from farmhand.contracts import IntentState
    from farmhand.store.base import IntentQuery

    async def run(co: Coordinator, _: Settings) -> list[IntentStatus]:
        return await co.list_intents(IntentQuery(state=IntentState.DEAD, limit=limit))

    found = with_coordinator(store, run)
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["id", "kind", "account", "key", "attempts", "reason", "since"],
        [(s.id, s.kind, s.account, s.key, s.attempts, s.reason, when(s.updated_at)) for s in found],
    )


@app.command()
def retry(
    refs: Annotated[list[str] | None, typer.Argument(help="Intent ids or keys.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Re-queue every dead letter.")] = False,
    reason: ReasonOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Send dead letters back to pending with a fresh allowance of attempts."""
    from farmhand.contracts import IntentState
    from farmhand.store.base import IntentQuery

    if bool(refs) == all_:
        raise InvalidInput("dlq retry needs intent ids or --all (not both)")

    async def run(co: Coordinator, _: Settings) -> list[IntentStatus]:
        targets = list(refs or [])
        if all_:
            dead = await co.list_intents(IntentQuery(state=IntentState.DEAD, limit=1_000_000))
            targets = [s.id for s in dead]
        return [await co.requeue(ref, actor_name(actor), reason) for ref in targets]

    done = with_coordinator(store, run)
    if as_json:
        print_json(done)
    else:
        for status in done:
            sys.stdout.write(f"{status.id} {status.state}\n")
