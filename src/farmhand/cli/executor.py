"""``farmhand executor run``: the hands, as a long-running process."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from farmhand.cli.common import JsonOption, StoreOption, print_json, settings_for

if TYPE_CHECKING:
    from farmhand.config import Settings
    from farmhand.executor import ExecutorStats
    from farmhand.secrets import SecretStore

app = typer.Typer(
    help="Run executors: claim intents, call connectors, write receipts.", no_args_is_help=True
)

log = logging.getLogger("farmhand.executor")


def configure_logging(verbose: bool) -> None:
    """Log lines on stderr: time, level, message."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def with_overrides(
    settings: Settings,
    lease_ttl: float | None = None,
    grace: float | None = None,
    concurrency: int | None = None,
) -> Settings:
    """Settings with executor values replaced by the flags that were given."""
    changes = {
        name: value
        for name, value in (
            ("lease_ttl", lease_ttl),
            ("grace", grace),
            ("concurrency", concurrency),
        )
        if value is not None
    }
    executor = dataclasses.replace(settings.executor, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(settings, executor=executor)


def load_secrets(settings: Settings) -> SecretStore:
    """The executor's secrets, loaded once; from here on every log record and uncaught
    traceback of this process is redacted."""
    from farmhand import secrets
    from farmhand.redact import install_excepthook, install_log_filter

    held = secrets.load(settings)
    names = [a.secret for a in settings.accounts.values() if a.secret is not None]
    redactor = held.redactor(names)
    install_log_filter(redactor)
    install_excepthook(redactor)
    for name, accounts in secrets.missing(settings, held).items():
        log.warning(
            "secret %r (used by account %s) is not on this host; those intents will be "
            "dead-lettered: %s",
            name,
            ", ".join(accounts),
            held.where(name),
        )
    return held


async def serve(
    settings: Settings,
    executor_id: str | None,
    drain: bool,
    secrets: SecretStore | None = None,
) -> ExecutorStats:
    """Run one executor until SIGTERM/SIGINT (graceful) or, with ``drain``, until idle.

    A second signal stops at once; calls then in flight are reconciled by the next holder.
    ``secrets`` default: loaded here (see :func:`load_secrets`).
    """
    import asyncio

    from farmhand.executor import Executor
    from farmhand.store import open_store

    if secrets is None:
        secrets = load_secrets(settings)

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    executor: Executor | None = None
    stop_early = False

    def on_signal(signum: int) -> None:
        nonlocal stop_early
        if executor is None:  # still starting: stop as soon as there is something to stop
            stop_early = True
            return
        if executor.stopping:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            if task is not None:
                task.cancel()
            return
        log.info(
            "%s: finishing in-flight work (up to %.0fs), then stopping",
            signal.Signals(signum).name,
            settings.executor.grace,
        )
        executor.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        store = await open_store(settings.store_url)
        try:
            executor = Executor(
                store,
                settings,
                executor_id=executor_id,
                drain=drain,
                secrets=secrets,
                call_timeout=settings.executor.call_timeout,
            )
        except BaseException:
            await store.close()
            raise
    except BaseException:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        raise
    if stop_early:
        executor.stop()
    log.info(
        "executor %s on %s, concurrency %d, lease %.0fs",
        executor.id,
        store.url,
        executor.concurrency,
        executor.ttl,
    )
    try:
        return await executor.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await store.close()


@app.command("run")
def run(
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Calls in flight at once [default: 16].")
    ] = None,
    executor_id: Annotated[
        str | None, typer.Option("--id", envvar="FARMHAND_EXECUTOR_ID", help="Executor name.")
    ] = None,
    drain: Annotated[
        bool, typer.Option("--drain", help="Exit once nothing is ready to run.")
    ] = False,
    lease_ttl: Annotated[
        float | None,
        typer.Option("--lease-ttl", min=0.5, help="Lease TTL in seconds [default: 30]."),
    ] = None,
    grace: Annotated[
        float | None, typer.Option(min=0, help="Seconds to finish in-flight work on shutdown.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Claim and execute intents until stopped (SIGTERM/SIGINT) or, with --drain, until idle."""
    import asyncio

    configure_logging(verbose)
    settings = with_overrides(settings_for(store), lease_ttl, grace, concurrency)
    try:
        stats = asyncio.run(serve(settings, executor_id, drain))
    except asyncio.CancelledError:
        raise typer.Exit(130) from None
    if as_json:
        print_json(dataclasses.asdict(stats))
    else:
        log.info(
            "stopped: %d succeeded, %d retried, %d dead, %d unknown, %d fenced",
            stats.succeeded,
            stats.retried,
            stats.dead,
            stats.unknown,
            stats.fenced,
        )
