"""``farmhand schema``: the JSON Schema of every published contract."""

from __future__ import annotations

from typing import Annotated

import typer

from farmhand.cli.common import print_json
from farmhand.errors import InvalidInput


def schema(
    name: Annotated[
        str | None, typer.Argument(help="Contract name (intent, receipt, ...); all when omitted.")
    ] = None,
    list_names: Annotated[bool, typer.Option("--list", help="Only list the names.")] = False,
) -> None:
    """Print the JSON Schema of a contract (always JSON)."""
    from farmhand.contracts import SCHEMAS

    if list_names:
        print_json(sorted(SCHEMAS))
        return
    if name is None:
        print_json({key: model.model_json_schema() for key, model in sorted(SCHEMAS.items())})
        return
    model = SCHEMAS.get(name)
    if model is None:
        raise InvalidInput(f"unknown contract {name!r}; known: {', '.join(sorted(SCHEMAS))}")
    print_json(model.model_json_schema())
