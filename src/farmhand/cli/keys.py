"""``farmhand keys``: Ed25519 signing keys, rotated by generating and retired by revoking."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from farmhand.cli.common import (
    ActorOption,
    JsonOption,
    actor_name,
    note,
    print_json,
    table,
    when,
)

if TYPE_CHECKING:
    from farmhand.keys import KeyInfo, Keyring

app = typer.Typer(
    help="Signing keys: generate (also to rotate), list, revoke. Exit code 8: key problems.",
    no_args_is_help=True,
)

OwnerOption = Annotated[
    str, typer.Option("--owner", help="Who signs with the key: coordinator or an approver.")
]
RoleOption = Annotated[
    str,
    typer.Option(
        "--role", help="coordinator (signs intents) or approver (signs approvals).", metavar="ROLE"
    ),
]
ReasonOption = Annotated[str | None, typer.Option(help="Why, recorded with the revocation.")]


def _keyring() -> Keyring:
    from farmhand.cli.common import settings_for
    from farmhand.keys import Keyring

    return Keyring(settings_for(None).home / "keys")


def _revocation(info: KeyInfo) -> str:
    if info.revoked_at is None:
        return ""
    text = f"{when(info.revoked_at)} by {info.revoked_by or 'unknown'}"
    return f"{text}: {info.revoke_reason}" if info.revoke_reason else text


@app.command()
def generate(
    owner: OwnerOption = "coordinator",
    role: RoleOption = "coordinator",
    as_json: JsonOption = False,
) -> None:
    """Create a key pair for OWNER. The newest key signs; older ones stay trusted until revoked."""
    keyring = _keyring()
    info = keyring.generate(owner, role)
    if as_json:
        print_json({**info.to_json(), "private_key": str(keyring.private_path(info.key_id))})
        return
    sys.stdout.write(f"{info.key_id}\n")
    sys.stderr.write(
        f"farmhand: generated {info.role} key {info.key_id} for {info.owner}; copy "
        f"{keyring.public_dir / (info.key_id + '.json')} to every executor's keys/public/\n"
    )


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """Show every known key: owner, role, when created, whether revoked, whether held here."""
    keyring = _keyring()
    keys = keyring.keys()
    if as_json:
        print_json([{**k.to_json(), "private": keyring.has_private(k.key_id)} for k in keys])
        return
    if not keys:
        sys.stdout.write(
            f"no keys in {keyring.directory}; create one with `farmhand keys generate`\n"
        )
        return
    table(
        None,
        ["key id", "owner", "role", "created", "revoked", "private"],
        [
            (
                k.key_id,
                k.owner,
                k.role,
                when(k.created_at),
                _revocation(k),
                "yes" if keyring.has_private(k.key_id) else "",
            )
            for k in keys
        ],
    )


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key to revoke (see `farmhand keys list`).")],
    reason: ReasonOption = None,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Revoke a key for good: everything it signed fails verification from now on."""
    keyring = _keyring()
    known = keyring.keys()
    already = any(k.key_id == key_id and k.revoked for k in known)
    info = keyring.revoke(key_id, actor_name(actor), reason)
    if already:
        note(f"{key_id} was already revoked; its first revocation stands")
    if as_json:
        print_json(info.to_json())
        return
    sys.stdout.write(f"revoked {info.key_id} ({info.owner}): {_revocation(info)}\n")
