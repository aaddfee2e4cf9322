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
call_timeout = 10     # longest connector call; capped at half of lease_ttl (raise both for
                      # long deployments)

[executor.retry]
base_delay = 1.0      # first retry waits 0.5-1 s, then doubles (with jitter)...
max_delay = 300.0     # ...up to this ceiling; Retry-After from a provider is honoured

[breaker]
failures = 5          # consecutive failures that open a connector+account's breaker...
cooldown = 30         # ...and seconds before one probe call may close it again

# -- Policy: who may ask for what. The coordinator checks it at submit, every executor
# -- again before each attempt. Without an [agents] section executors refuse to act.

# The local agent (the default --agent) may request webhook posts and no-ops on any account.
[agents.local]
kinds = ["webhook.post", "noop"]
accounts = ["*"]
# url_hosts = ["hooks.example.org"]     # only these hosts for webhook.post
# email_domains = ["example.org"]       # only these recipient domains for email.send

# Approvals: intents matching a rule wait in `awaiting_approval` until enough approvers
# run `farmhand approve ID --as NAME` (each needs a key: farmhand keys generate --owner NAME
# --role approver). An approval is bound to the intent's exact payload and expires.
# [[approvals]]
# kind = "webhook.post"
# account = "billing"
# required = 1
# approvers = ["alice", "bob"]
# lifetime = 86400                      # seconds

# Accounts as the executor host knows them. A target that honours Idempotency-Key can be
# called again after an interrupted attempt; otherwise such an intent waits in `unknown`
# for `farmhand resolve`.
[accounts.default]
honours_idempotency_key = false
# secret = "DEFAULT_TOKEN"              # sent as a bearer token; the value lives only on the
#                                       # executor host (FARMHAND_SECRET_DEFAULT_TOKEN or
#                                       # secrets.toml, mode 0600)
# rate = 5.0                            # calls per second for every executor together
# burst = 5
"""


def ensure_initialised(settings: Settings) -> dict[str, object]:
    """Create the home, a starter farmhand.toml and the coordinator's signing key if missing.

    Never overwrites: an existing config or key is kept as it is.
    """
    from farmhand.config import CONFIG_NAME
    from farmhand.keys import Keyring

    settings.home.mkdir(parents=True, exist_ok=True)
    config = settings.home / CONFIG_NAME
    config_created = not config.exists()
    if config_created:
        config.write_text(STARTER_CONFIG, encoding="utf-8")
    keyring = Keyring(settings.home / "keys")
    key_created = not keyring.has_signer("coordinator")
    if key_created:
        keyring.generate("coordinator", "coordinator")
    return {
        "home": str(settings.home),
        "config": str(config),
        "config_created": config_created,
        "signing_key_created": key_created,
        "store": settings.store_url,
    }


def init(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Create the home directory, a commented starter policy (farmhand.toml), the
    coordinator's signing key and the store. Existing files are kept."""
    import asyncio

    settings = settings_for(store)
    done = ensure_initialised(settings)

    async def open_and_close() -> None:
        from farmhand.store import open_store

        opened = await open_store(settings.store_url)
        await opened.close()

    asyncio.run(open_and_close())
    if as_json:
        print_json(done)
        return
    sys.stdout.write(f"home    {settings.home}\n")
    sys.stdout.write(f"config  {done['config']}{'' if done['config_created'] else ' (kept)'}\n")
    key_note = "generated" if done["signing_key_created"] else "kept"
    sys.stdout.write(f"key     coordinator signing key {key_note}\n")
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

        # the demo is the two-command start: it sets up a fresh home the way init would
        if ensure_initialised(settings)["config_created"]:
            settings = with_overrides(settings_for(store), concurrency=concurrency)
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
