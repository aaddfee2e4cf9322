"""``farmhand init`` and ``farmhand up``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from farmhand.cli.common import JsonOption, StoreOption, print_json, settings_for

if TYPE_CHECKING:
    from farmhand.config import Settings

STARTER_CONFIG = """\
# farmhand settings. Values here are overridden by FARMHAND_* variables and CLI flags.

# Where state lives. Default: sqlite under this directory.
# store = "sqlite:///absolute/path/farmhand.db"

[executor]
lease_ttl = 30        # seconds an executor holds an intent before another may take over
concurrency = 16      # calls in flight at once per executor
grace = 10            # seconds to finish in-flight calls on SIGTERM/SIGINT

[executor.retry]
base_delay = 1.0      # first retry waits 0.5-1 s, then doubles (with jitter)...
max_delay = 300.0     # ...up to this ceiling; Retry-After from a provider is honoured

# Accounts as the executor host knows them. A target that honours Idempotency-Key can be
# called again after an interrupted attempt; otherwise such an intent waits in `unknown`
# for `farmhand resolve`.
[accounts.default]
honours_idempotency_key = false
"""


def init(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Create the home directory, a commented farmhand.toml and the store."""
    import asyncio

    from farmhand.config import CONFIG_NAME

    settings = settings_for(store)
    settings.home.mkdir(parents=True, exist_ok=True)
    config = settings.home / CONFIG_NAME
    created = not config.exists()
    if created:
        config.write_text(STARTER_CONFIG, encoding="utf-8")

    async def open_and_close() -> None:
        from farmhand.store import open_store

        opened = await open_store(settings.store_url)
        await opened.close()

    asyncio.run(open_and_close())
    if as_json:
        print_json(
            {
                "home": str(settings.home),
                "config": str(config),
                "store": settings.store_url,
                "config_created": created,
            }
        )
        return
    sys.stdout.write(f"home    {settings.home}\n")
    sys.stdout.write(f"config  {config}{'' if created else ' (kept)'}\n")
    sys.stdout.write(f"store   {settings.store_url}\n")


def up(
    demo: Annotated[
        bool, typer.Option("--demo", help="Start a loopback webhook sink and demo intents.")
    ] = False,
    duration: Annotated[
        float | None, typer.Option(min=0, help="Stop after this many seconds.")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, max=10_000)] = None,
    store: StoreOption = None,
) -> None:
    """Run the main job: an executor on the store (with --demo, a self-contained demo)."""
    import asyncio

    from farmhand.cli.executor import configure_logging, with_overrides

    settings: Settings = with_overrides(settings_for(store), concurrency=concurrency)
    if demo:
        from farmhand.demo import run_demo

        code = asyncio.run(run_demo(settings, duration))
        raise typer.Exit(code)
    configure_logging(False)
    from farmhand.cli.executor import serve

    async def bounded() -> None:
        task = asyncio.ensure_future(serve(settings, None, False))
        if duration is None:
            await task
            return
        done, _ = await asyncio.wait({task}, timeout=duration)
        if not done:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
            await task

    asyncio.run(bounded())
