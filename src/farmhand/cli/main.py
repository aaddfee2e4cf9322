"""The ``farmhand`` entry point: wiring only, every command lives in its own module.

Exit codes: 0 ok, 1 error, 2 invalid input or usage, 3 idempotency conflict, 4 not found,
5 store error, 6 invalid state transition, 130 interrupted.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Annotated

# pydantic otherwise walks every installed package's entry points looking for plugins on
# its first model, ~16 ms of each CLI call; set the variable to "" to load plugins anyway.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer

from farmhand._version import __version__
from farmhand.cli import (
    approvals,
    dlq,
    doctor,
    executor,
    gate,
    intents,
    keys,
    schema,
    setup,
    store,
)
from farmhand.errors import FarmhandError

EXIT_CODES = (
    "Exit codes: 0 ok, 1 error, 2 invalid input or usage, 3 idempotency conflict, "
    "4 not found, 5 store error, 6 invalid state transition, 7 forbidden by policy, "
    "8 signature or key problem, 130 interrupted."
)

app = typer.Typer(
    name="farmhand",
    help="Intents in, receipts out: safe side effects for AI-agent farms.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"farmhand {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Intents in, receipts out: safe side effects for AI-agent farms."""


app.command()(setup.init)
app.command()(setup.up)
app.command()(intents.submit)
app.command()(intents.status)
app.command("list")(intents.list_)
app.command()(intents.receipts)
app.command()(intents.cancel)
app.command()(intents.resolve)
app.command()(approvals.approve)
app.command()(approvals.reject)
app.command()(intents.audit)
app.command()(schema.schema)
app.command()(doctor.doctor)
app.add_typer(gate.app, name="gate")
app.add_typer(keys.app, name="keys")
app.add_typer(dlq.app, name="dlq")
app.add_typer(executor.app, name="executor")
app.add_typer(store.app, name="store")


def main() -> None:
    """Run the CLI; errors become one line on stderr and their exit code."""
    import click

    try:
        code = app(prog_name="farmhand", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        sys.stdout.write(exc.format_message() + "\n")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "farmhand"  # type: ignore[attr-defined]
        # typer repeats click's "Did you mean ...?" hint: keep each sentence once
        message = exc.format_message().replace("\n", " ")
        message = re.sub(r"(Did you mean [^?]*\?)(\s*\1)+", r"\1", message)
        sys.stderr.write(f"farmhand: error: {message} (see {command} --help)\n")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.stderr.write("farmhand: interrupted\n")
        sys.exit(130)
    except FarmhandError as exc:
        message = str(exc).replace("\n", " ")
        sys.stderr.write(f"farmhand: error: {message}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("farmhand: interrupted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
