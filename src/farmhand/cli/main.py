"""The ``farmhand`` entry point: wiring only, every command lives in its own module.

Exit codes: 0 ok, 1 error, 2 invalid input or usage, 3 idempotency conflict, 4 not found,
5 store error, 6 invalid state transition, 130 interrupted.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Annotated

# pydantic otherwise walks every installed package's entry points looking for plugins on
# its first model, ~16 ms of each CLI call; set the variable to "" to load plugins anyway.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import click
import typer
from typer.core import TyperGroup

from farmhand._version import __version__
from farmhand.errors import FarmhandError

EXIT_CODES = (
    "Exit codes: 0 ok, 1 error, 2 invalid input or usage, 3 idempotency conflict, "
    "4 not found, 5 store error, 6 invalid state transition, 7 forbidden by policy, "
    "8 signature or key problem, 130 interrupted."
)

#: Every command and command group, in the order ``--help`` lists them: its module and the
#: command function or typer app in it.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("farmhand.cli.setup", "init"),
    "up": ("farmhand.cli.setup", "up"),
    "submit": ("farmhand.cli.intents", "submit"),
    "status": ("farmhand.cli.intents", "status"),
    "list": ("farmhand.cli.intents", "list_"),
    "receipts": ("farmhand.cli.intents", "receipts"),
    "cancel": ("farmhand.cli.intents", "cancel"),
    "resolve": ("farmhand.cli.intents", "resolve"),
    "approve": ("farmhand.cli.approvals", "approve"),
    "reject": ("farmhand.cli.approvals", "reject"),
    "audit": ("farmhand.cli.intents", "audit"),
    "schema": ("farmhand.cli.schema", "schema"),
    "doctor": ("farmhand.cli.doctor", "doctor"),
    "gate": ("farmhand.cli.gate", "app"),
    "keys": ("farmhand.cli.keys", "app"),
    "dlq": ("farmhand.cli.dlq", "app"),
    "executor": ("farmhand.cli.executor", "app"),
    "store": ("farmhand.cli.store", "app"),
}


def _build(name: str) -> click.Command:
    """The click command for ``name``, made by typer as ``app.command``/``app.add_typer``
    would have made it."""
    module, attribute = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(
        add_completion=False,
        rich_markup_mode=app.rich_markup_mode,
        pretty_exceptions_short=app.pretty_exceptions_short,
        suggest_commands=app.suggest_commands,
    )
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    return typer.main.get_group(holder).commands[name]


class _LazyGroup(TyperGroup):
    """The root group. Only the command being run is imported and built: typer turning
    all of them into click commands, and importing their modules, cost ~40 ms a call."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in COMMANDS:
            command = _build(cmd_name)
            self.add_command(command, cmd_name)
        elif command is None:
            # an unknown name: typer suggests close matches from every command it holds
            for name in COMMANDS:
                self.get_command(ctx, name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)


app = typer.Typer(
    name="farmhand",
    cls=_LazyGroup,
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


def main() -> None:
    """Run the CLI; errors become one line on stderr and their exit code."""
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
