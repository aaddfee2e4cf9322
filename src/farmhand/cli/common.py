"""What every command shares: store/actor options, running the async API, printing results.

Kept free of heavy imports: an agent calls the CLI once per action, so start-up time counts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel

    from farmhand.config import Settings
    from farmhand.contracts import IntentStatus
    from farmhand.coordinator import Coordinator
    from farmhand.signing import Signer

T = TypeVar("T")

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="FARMHAND_STORE",
        help="Store URL, e.g. sqlite:///path/farmhand.db (default: under $FARMHAND_HOME).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ActorOption = Annotated[
    str | None,
    typer.Option(
        "--as",
        envvar="FARMHAND_ACTOR",
        help="Who is acting, for the audit log (default: your user name).",
        show_default=False,
    ),
]


RefArgument = Annotated[str, typer.Argument(help="Intent id or idempotency key.")]
IntentFilterOption = Annotated[
    str | None, typer.Option("--intent", help="Only this intent (id or key).")
]
LimitOption = Annotated[int, typer.Option(min=1, max=100_000, help="At most this many.")]
ReasonOption = Annotated[str | None, typer.Option(help="Why, for the audit log.")]


def emit_status(status: IntentStatus, as_json: bool) -> None:
    """Print an intent after a change: the whole object with --json, else "ID STATE"."""
    if as_json:
        print_json(status)
    else:
        sys.stdout.write(f"{status.id} {status.state}\n")


def actor_name(value: str | None) -> str:
    """The actor recorded in the audit log."""
    if value:
        return value
    import getpass  # only commands that record an actor use it (not submit or executor)

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


def settings_for(store: str | None) -> Settings:
    """Settings resolved from the flag, the environment and farmhand.toml."""
    from farmhand.config import load

    return load(store=store)


def with_coordinator(
    store: str | None,
    action: Callable[[Coordinator, Settings], Awaitable[T]],
    signing: bool = False,
) -> T:
    """Open the store, run ``action`` with a coordinator, close the store.

    With ``signing``, the coordinator's key must exist: executors refuse unsigned intents,
    so storing one would only fill the dead-letter queue.
    """
    import asyncio

    settings = settings_for(store)
    # only submitting signs: reading or managing intents never touches the private key
    signer = coordinator_signer(settings) if signing else None
    if signing and signer is None:
        from farmhand.signing import KeyMissing

        raise KeyMissing(
            f"no coordinator signing key in {settings.home / 'keys'}: run farmhand init (or "
            "farmhand keys generate) on this host before submitting"
        )

    async def run() -> T:
        from farmhand.coordinator import Coordinator
        from farmhand.store import open_store

        opened = await open_store(settings.store_url)
        try:
            coordinator = Coordinator(
                opened, policy=settings.policy, signer=signer, accounts=settings.accounts
            )
            return await action(coordinator, settings)
        finally:
            await opened.close()

    return asyncio.run(run())


def coordinator_signer(settings: Settings) -> Signer | None:
    """The coordinator's signing key on this host, if one was generated (farmhand init)."""
    if not (settings.home / "keys" / "private").is_dir():
        return None
    from farmhand.keys import Keyring

    keyring = Keyring(settings.home / "keys")
    return keyring.signer("coordinator") if keyring.has_signer("coordinator") else None


def print_json(value: Any) -> None:
    """Print a model, a list of models or plain data as JSON on stdout."""
    sys.stdout.write(json.dumps(_plain(value), ensure_ascii=False) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        model: BaseModel = value
        return model.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def note(message: str) -> None:
    """A human-facing remark on stderr (never mixed into stdout)."""
    sys.stderr.write(f"farmhand: {message}\n")


def table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    """Print a Rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*("" if cell is None else str(cell) for cell in row))
    Console().print(out)


def when(value: Any) -> str:
    """A timestamp shown to humans (seconds precision, UTC)."""
    if value is None:
        return ""
    return str(value.strftime("%Y-%m-%d %H:%M:%SZ"))
