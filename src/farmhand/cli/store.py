"""``farmhand store``: the store itself, its schema."""

from __future__ import annotations

import sys

import typer

from farmhand.cli.common import JsonOption, StoreOption, print_json, settings_for

app = typer.Typer(help="The store itself: schema migrations.", no_args_is_help=True)


@app.command()
def migrate(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Apply the schema migrations the store lacks, then print its schema version.

    Safe to run any number of times, from several hosts at once. Opening a store migrates
    it as well; running this first makes the change a deliberate step of an upgrade. Stores
    without a versioned schema (folder, Redis) are only opened, and say so.
    """
    import asyncio

    from farmhand.store.migrate import migrate as run

    report = asyncio.run(run(settings_for(store).store_url))
    if as_json:
        print_json(report.to_json())
    else:
        sys.stdout.write(report.summary() + "\n")
