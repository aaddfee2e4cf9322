"""``farmhand gate``: the kill switch, global or per kind and per account."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from farmhand.cli.common import (
    ActorOption,
    JsonOption,
    ReasonOption,
    StoreOption,
    actor_name,
    print_json,
    table,
    when,
    with_coordinator,
)

if TYPE_CHECKING:
    from farmhand.config import Settings
    from farmhand.contracts import GateRule
    from farmhand.coordinator import Coordinator

app = typer.Typer(
    help="Kill switch: stop (off) or allow (on) side effects, globally or per kind/account.",
    no_args_is_help=True,
)

KindOption = Annotated[str | None, typer.Option(help="Only this kind (default: every kind).")]
AccountOption = Annotated[
    str | None, typer.Option(help="Only this account (default: every account).")
]


def _set(
    open_: bool,
    kind: str | None,
    account: str | None,
    reason: str | None,
    store: str | None,
    as_json: bool,
    actor: str | None,
) -> None:
    async def run(co: Coordinator, _: Settings) -> GateRule:
        return await co.set_gate(open_, actor_name(actor), kind, account, reason)

    rule = with_coordinator(store, run)
    if as_json:
        print_json(rule)
    else:
        sys.stdout.write(f"gate {'on' if rule.open else 'off'}: {rule.scope}\n")


@app.command()
def off(
    kind: KindOption = None,
    account: AccountOption = None,
    reason: ReasonOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Stop side effects in a scope. Calls already in flight finish; no new call starts."""
    _set(False, kind, account, reason, store, as_json, actor)


@app.command()
def on(
    kind: KindOption = None,
    account: AccountOption = None,
    reason: ReasonOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Allow side effects in a scope again (other closed scopes stay closed)."""
    _set(True, kind, account, reason, store, as_json, actor)


@app.command()
def status(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Show every scope's gate, who set it and why."""

    async def run(co: Coordinator, _: Settings) -> list[GateRule]:
        return await co.gates()

    rules = with_coordinator(store, run)
    closed = [r for r in rules if not r.open]
    if as_json:
        print_json(
            {
                "open": not any(r.kind is None and r.account is None for r in closed),
                "closed": closed,
                "rules": rules,
            }
        )
        return
    if not rules:
        sys.stdout.write("gate on: every kind, every account (never changed)\n")
        return
    table(
        None,
        ["kind", "account", "gate", "by", "reason", "since"],
        [
            (
                r.kind or "*",
                r.account or "*",
                "on" if r.open else "OFF",
                r.actor,
                r.reason,
                when(r.changed_at),
            )
            for r in rules
        ],
    )
