"""Producer and operator commands on intents: submit, status, list, receipts, cancel, resolve."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from farmhand.cli.common import (
    ActorOption,
    IntentFilterOption,
    JsonOption,
    LimitOption,
    ReasonOption,
    RefArgument,
    StoreOption,
    actor_name,
    emit_status,
    note,
    print_json,
    table,
    when,
    with_coordinator,
)
from farmhand.errors import FarmhandError, InvalidInput

if TYPE_CHECKING:
    from farmhand.config import Settings
    from farmhand.contracts import Intent, IntentStatus, Receipt
    from farmhand.coordinator import Coordinator, SubmitRequest

_BATCH_FIELDS = {
    "kind",
    "key",
    "payload",
    "account",
    "agent",
    "not_before",
    "expires_at",
    "max_attempts",
    "schema_version",
}


def _request(
    kind: str,
    key: str,
    payload: Any,
    account: str | None,
    agent: str | None,
    not_before: str | None,
    expires: str | None,
    max_attempts: int | None,
) -> SubmitRequest:
    from farmhand.cli.parse import parse_time
    from farmhand.coordinator import SubmitRequest

    return SubmitRequest(
        kind=kind,
        key=key,
        payload=payload,
        account=account or "default",
        agent=agent or "local",
        not_before=parse_time(not_before, "--not-before"),
        expires_at=parse_time(expires, "--expires"),
        max_attempts=5 if max_attempts is None else max_attempts,
    )


def _batch_line(number: int, text: str) -> SubmitRequest:
    import json

    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"line {number}: malformed JSON: {exc.msg}") from None
    if not isinstance(item, dict):
        raise InvalidInput(f"line {number}: expected a JSON object")
    unknown = sorted(set(item) - _BATCH_FIELDS)
    if unknown:
        raise InvalidInput(f"line {number}: unknown field(s) {', '.join(unknown)}")
    if "schema_version" in item:
        from farmhand.contracts import check_schema_version

        check_schema_version(f"line {number}", item["schema_version"])
    missing = [name for name in ("kind", "key", "payload") if name not in item]
    if missing:
        raise InvalidInput(f"line {number}: missing field(s) {', '.join(missing)}")
    for name in ("kind", "key", "account", "agent", "not_before", "expires_at"):
        if name in item and not isinstance(item[name], str):
            raise InvalidInput(f"line {number}: {name} must be a string")
    attempts = item.get("max_attempts")
    if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int)):
        raise InvalidInput(f"line {number}: max_attempts must be an integer")
    return _request(
        item["kind"],
        item["key"],
        item["payload"],
        item.get("account"),
        item.get("agent"),
        item.get("not_before"),
        item.get("expires_at"),
        attempts,
    )


def _read_batch(source: str) -> list[str]:
    if source == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(source).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"--batch: cannot read {source}: {exc.strerror}") from None


def _submit_batch(source: str, store: str | None, as_json: bool, actor: str) -> None:
    async def run(co: Coordinator, _settings: Settings) -> list[tuple[int, Any]]:
        built: list[tuple[int, Intent]] = []
        outcome: list[tuple[int, Any]] = []
        for number, text in enumerate(_read_batch(source), start=1):
            if not text.strip():
                continue
            try:
                built.append((number, co.validate(_batch_line(number, text))))
            except FarmhandError as exc:
                message = str(exc)
                if not message.startswith("line "):
                    message = f"line {number}: {message}"
                outcome.append((number, type(exc)(message)))
        # the valid lines are signed together: executors check one signature for all of them
        signed = co.sign_intents([intent for _, intent in built])
        stored = await co.submit_many(signed, actor) if signed else []
        for (number, _intent), result in zip(built, stored, strict=True):
            outcome.append((number, result))
        return sorted(outcome, key=lambda pair: pair[0])

    results = with_coordinator(store, run, signing=True)
    errors = [r for _, r in results if isinstance(r, FarmhandError)]
    if as_json:
        print_json(
            [
                {"line": n, "error": str(r), "exit_code": r.exit_code}
                if isinstance(r, FarmhandError)
                else {"line": n, "id": r.status.id, "created": r.created}
                for n, r in results
            ]
        )
    else:
        for _, result in results:
            if isinstance(result, FarmhandError):
                note(f"error: {result}")
            else:
                sys.stdout.write(result.status.id + "\n")
    if errors:
        raise typer.Exit(max(e.exit_code for e in errors))


def submit(
    kind: Annotated[
        str | None, typer.Argument(help="Kind of side effect, e.g. webhook.post.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Idempotency key (max 255 chars).")
    ] = None,
    payload: Annotated[
        str | None, typer.Option("--payload", help="JSON object, or @file to read one.")
    ] = None,
    account: Annotated[str | None, typer.Option(help="Account the effect acts as.")] = None,
    agent: Annotated[str | None, typer.Option(help="Requesting agent id.")] = None,
    not_before: Annotated[
        str | None, typer.Option("--not-before", help="Earliest run time: ISO 8601, epoch or +5m.")
    ] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Give up after: ISO 8601, epoch or +1h.")
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            "--max-attempts", min=1, max=100, help="Attempts before dead-lettering [default: 5]."
        ),
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option("--batch", help="JSON-lines file ('-' for stdin), one intent per line."),
    ] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Submit an intent; prints its id. Same key and payload again returns the same id.

    Exit codes: 0 stored or already stored identically, 2 invalid input,
    3 the key is already used with a different payload, 5 store error.
    """
    if batch is not None:
        if kind or key or payload:
            raise InvalidInput("--batch takes intents from the file; drop KIND, --key, --payload")
        _submit_batch(batch, store, as_json, actor or "")
        return
    if not kind or key is None or payload is None:
        raise InvalidInput("submit needs KIND, --key and --payload (or --batch FILE)")
    from farmhand.cli.parse import parse_json_arg

    request = _request(
        kind,
        key,
        parse_json_arg(payload, "--payload"),
        account,
        agent,
        not_before,
        expires,
        max_attempts,
    )

    async def run(co: Coordinator, _: Settings) -> Any:
        return await co.submit(request, actor or None)

    result = with_coordinator(store, run, signing=True)
    if not result.created:
        note(f"key {key!r} was already submitted as {result.status.id}; nothing new stored")
    if as_json:
        print_json(result.status)
    else:
        sys.stdout.write(result.status.id + "\n")


def _show_status(status: IntentStatus) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{status.id}[/bold]  {status.kind}  account={status.account}")
    console.print(f"  key       {status.key}")
    console.print(
        f"  state     [bold]{status.state}[/bold]  attempts {status.attempts}/{status.max_attempts}"
    )
    if status.reason:
        console.print(f"  reason    {status.reason}")
    console.print(f"  created   {when(status.created_at)}  updated {when(status.updated_at)}")
    if status.next_attempt_at and status.state in ("pending", "retry_wait"):
        console.print(f"  next      {when(status.next_attempt_at)}")
    console.print(f"  payload   {status.payload_hash}")
    if status.receipts:
        _show_receipts(status.receipts, title=None)


def _show_receipts(receipts: list[Receipt], title: str | None) -> None:
    table(
        title,
        ["intent", "attempt", "outcome", "external id", "url", "error", "finished"],
        [
            (r.intent_id, r.attempt, r.outcome, r.external_id, r.url, r.error, when(r.finished_at))
            for r in receipts
        ],
    )


def status(
    ref: RefArgument,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one intent: its state, attempts and receipts. Exit 4 if unknown."""

    async def run(co: Coordinator, _: Settings) -> IntentStatus:
        return await co.status(ref)

    found = with_coordinator(store, run)
    if as_json:
        print_json(found)
    else:
        _show_status(found)


def list_(
    state: Annotated[str | None, typer.Option(help="Only intents in this state.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    limit: LimitOption = 100,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List intents, newest first."""
    from farmhand.contracts import IntentState
    from farmhand.store.base import IntentQuery

    try:
        wanted = IntentState(state) if state else None
    except ValueError:
        raise InvalidInput(
            f"--state: unknown state {state!r}; use one of "
            + ", ".join(s.value for s in IntentState)
        ) from None
    query = IntentQuery(state=wanted, kind=kind, account=account, limit=limit)

    async def run(co: Coordinator, _: Settings) -> list[IntentStatus]:
        return await co.list_intents(query)

    found = with_coordinator(store, run)
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["id", "kind", "account", "key", "state", "attempts", "updated", "reason"],
        [
            (s.id, s.kind, s.account, s.key, s.state, s.attempts, when(s.updated_at), s.reason)
            for s in found
        ],
    )


async def _intent_id(co: Coordinator, ref: str | None) -> str | None:
    """The id of the intent an ``--intent`` filter names (by id or key), if one was given."""
    return (await co.status(ref)).id if ref else None


def receipts(
    intent: IntentFilterOption = None,
    limit: LimitOption = 100,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List receipts (successes and failure records), newest first."""

    async def run(co: Coordinator, _: Settings) -> list[Receipt]:
        intent_id = await _intent_id(co, intent)
        return await co.store.receipts(intent_id, limit)

    found = with_coordinator(store, run)
    if as_json:
        print_json(found)
    else:
        _show_receipts(found, title=None)


def cancel(
    ref: RefArgument,
    reason: ReasonOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Cancel an intent that has not run yet. Exit 6 if it already ran or is running."""

    async def run(co: Coordinator, _: Settings) -> IntentStatus:
        return await co.cancel(ref, actor_name(actor), reason)

    emit_status(with_coordinator(store, run), as_json)


def resolve(
    ref: Annotated[str, typer.Argument(help="Intent id or key, in state unknown.")],
    succeeded: Annotated[
        bool, typer.Option("--succeeded", help="The effect happened (give --external-id/--url).")
    ] = False,
    retry: Annotated[
        bool, typer.Option("--retry", help="It did not happen: run it again.")
    ] = False,
    fail: Annotated[bool, typer.Option("--fail", help="Give up: dead-letter it.")] = False,
    external_id: Annotated[str | None, typer.Option("--external-id")] = None,
    url: Annotated[str | None, typer.Option("--url")] = None,
    reason: ReasonOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Settle an intent whose outcome is unknown (an attempt was interrupted mid-call)."""
    chosen = [
        name for name, flag in (("succeeded", succeeded), ("retry", retry), ("fail", fail)) if flag
    ]
    if len(chosen) != 1:
        raise InvalidInput("resolve needs exactly one of --succeeded, --retry, --fail")
    if (external_id or url) and not succeeded:
        raise InvalidInput("--external-id and --url go with --succeeded")

    async def run(co: Coordinator, _: Settings) -> IntentStatus:
        return await co.resolve(
            ref, chosen[0], f"human:{actor_name(actor)}", reason, external_id, url
        )

    emit_status(with_coordinator(store, run), as_json)


def audit(
    intent: IntentFilterOption = None,
    limit: LimitOption = 100,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the audit log, newest first: who changed what, when and why."""
    from farmhand.contracts import AuditEvent

    async def run(co: Coordinator, _: Settings) -> list[AuditEvent]:
        intent_id = await _intent_id(co, intent)
        return await co.store.audit(intent_id, limit)

    found = with_coordinator(store, run)
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["at", "actor", "action", "intent", "from", "to", "reason"],
        [
            (when(e.at), e.actor, e.action, e.intent_id, e.from_state, e.to_state, e.reason)
            for e in found
        ],
    )
