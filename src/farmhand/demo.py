"""``farmhand up --demo``: a loopback webhook sink, an executor and a handful of intents.

Shows the whole contract on the embedded store: idempotent submit (one duplicate key),
receipts with external ids and links, a retry that succeeds, and a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Callable
from typing import Any

from farmhand.config import RetryConfig, Settings
from farmhand.contracts import IntentState, IntentStatus
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.executor import Executor
from farmhand.ids import new_id
from farmhand.keys import Keyring
from farmhand.store import open_store
from farmhand.testing.sink import WebhookSink

_STYLE = {
    "succeeded": "green",
    "dead": "red",
    "unknown": "magenta",
    "retry_wait": "yellow",
    "running": "cyan",
}


def demo_requests(run: str, sink_url: str) -> list[SubmitRequest]:
    """The demo's intents; the second repeats the first's key and payload."""

    def hook(key: str, path: str, body: dict[str, Any], attempts: int = 5) -> SubmitRequest:
        return SubmitRequest(
            kind="webhook.post",
            key=f"demo-{run}-{key}",
            payload={"url": f"{sink_url}{path}", "json": body},
            account="demo",
            agent="local",
            max_attempts=attempts,
        )

    return [
        hook("welcome", "/ok", {"text": "hello from farmhand"}),
        hook("welcome", "/ok", {"text": "hello from farmhand"}),  # duplicate: same intent
        hook("post-1", "/ok", {"text": "first post"}),
        hook("post-2", "/slow?ms=300", {"text": "a slow target"}),
        hook("flaky", "/flaky?fail_times=2", {"text": "succeeds on the third attempt"}),
        hook("broken", "/fail", {"text": "this target always fails"}, attempts=3),
        SubmitRequest(kind="noop", key=f"demo-{run}-noop", payload={}),
    ]


def _demo_settings(settings: Settings) -> Settings:
    executor = dataclasses.replace(
        settings.executor, retry=RetryConfig(base_delay=0.5, max_delay=2.0), grace=5.0
    )
    return dataclasses.replace(settings, executor=executor)


def _render(statuses: list[IntentStatus], sink: WebhookSink) -> Any:
    from rich.table import Table

    table = Table(title=f"farmhand demo (sink {sink.url})", header_style="bold")
    for column in ("key", "kind", "state", "attempts", "external id", "url / error"):
        table.add_column(column, overflow="fold")
    for status in statuses:
        last = status.receipts[-1] if status.receipts else None
        detail = ""
        if last is not None:
            detail = last.url or last.error or ""
        style = _STYLE.get(status.state, "")
        table.add_row(
            status.key,
            status.kind,
            f"[{style}]{status.state}[/{style}]" if style else status.state,
            str(status.attempts),
            last.external_id if last and last.external_id else "",
            detail,
        )
    effects = len(sink.effects())
    table.caption = (
        f"{len(sink.calls())} calls at the sink, {effects} effects, "
        f"{sink.repeated_calls()} repeats answered idempotently"
    )
    return table


async def run_demo(settings: Settings, duration: float | None) -> int:
    """Run the demo until every demo intent settles and Ctrl-C (or ``duration``) arrives."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    settings = _demo_settings(settings)
    store = await open_store(settings.store_url)
    sink = WebhookSink().start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if duration is not None:
        loop.call_later(duration, stop.set)
    executor = Executor(store, settings, executor_id="demo-executor")
    running = asyncio.create_task(executor.run())
    try:
        signer = Keyring(settings.home / "keys").signer("coordinator")
        coordinator = Coordinator(store, policy=settings.policy, signer=signer)
        run = new_id("r")[-6:]
        ids: list[str] = []
        for request in demo_requests(run, sink.url):
            submitted = await coordinator.submit(request)
            note = (
                ""
                if submitted.created
                else "  (same key and payload: same intent, not stored again)"
            )
            console.print(f"submitted {request.key} -> {submitted.status.id}{note}", soft_wrap=True)
            if submitted.status.id not in ids:
                ids.append(submitted.status.id)

        async def snapshot() -> list[IntentStatus]:
            return [await coordinator.status(i) for i in ids]

        settled: Callable[[list[IntentStatus]], bool] = lambda statuses: all(  # noqa: E731
            s.state.terminal or s.state is IntentState.UNKNOWN for s in statuses
        )
        statuses = await snapshot()
        with Live(_render(statuses, sink), console=console, auto_refresh=False) as live:
            while not stop.is_set():
                statuses = await snapshot()
                live.update(_render(statuses, sink), refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
        if settled(statuses):
            console.print()
            console.print(
                "every demo intent settled; inspect them with [bold]farmhand list[/bold], "
                "[bold]farmhand receipts[/bold], [bold]farmhand dlq list[/bold], "
                "[bold]farmhand audit[/bold]"
            )
        return 0
    finally:
        executor.stop()
        await running
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        sink.stop()
        await store.close()
