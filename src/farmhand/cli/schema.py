"""``farmhand schema``: the JSON Schema of every published contract and connector payload."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from farmhand.cli.common import print_json
from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    from pydantic import BaseModel


def _payload_model(kind: str) -> type[BaseModel] | None:
    """The payload model a connector publishes (raises UnknownKind)."""
    from farmhand.connectors import connector_class

    return connector_class(kind).payload_model


def _payload_models() -> dict[str, type[BaseModel]]:
    """Every installed kind's payload model; a connector that cannot be loaded here (a
    broken plugin) is left out of the listing: naming it alone shows why."""
    from farmhand.connectors import known_kinds

    found = {}
    for kind in known_kinds():
        try:
            model = _payload_model(kind)
        except Exception:  # one broken plugin must not hide every other schema
            continue
        if model is not None:
            found[kind] = model
    return found


def schema(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Contract name (intent, receipt, ...) or connector kind (email.send, ...) for "
            "its payload; all when omitted."
        ),
    ] = None,
    list_names: Annotated[bool, typer.Option("--list", help="Only list the names.")] = False,
) -> None:
    """Print the JSON Schema of a contract or of a connector's payload (always JSON)."""
    from farmhand.contracts import SCHEMAS

    if list_names:
        print_json([*sorted(SCHEMAS), *sorted(_payload_models())])
        return
    if name is None:
        everything: dict[str, Any] = {
            key: model.model_json_schema() for key, model in sorted(SCHEMAS.items())
        }
        for kind, model in sorted(_payload_models().items()):
            everything[kind] = model.model_json_schema()
        print_json(everything)
        return
    contract = SCHEMAS.get(name)
    if contract is not None:
        print_json(contract.model_json_schema())
        return
    from farmhand.connectors import known_kinds

    if name not in known_kinds():
        raise InvalidInput(
            f"unknown contract or kind {name!r}; known: "
            + ", ".join([*sorted(SCHEMAS), *sorted(_payload_models())])
        )
    try:
        payload = _payload_model(name)
    except ImportError as exc:
        raise InvalidInput(f"kind {name!r}: its connector cannot be loaded: {exc}") from None
    if payload is None:
        raise InvalidInput(f"kind {name!r} publishes no payload schema; see its documentation")
    print_json(payload.model_json_schema())
