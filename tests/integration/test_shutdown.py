"""Graceful shutdown of a real executor process on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farmhand.testing.sink import WebhookSink
from homes import prepare_home

FARMHAND = str(Path(sys.executable).with_name("farmhand"))


@pytest.fixture(autouse=True)
def _policy_and_key(tmp_path: Path) -> None:
    """Tests use tmp_path as FARMHAND_HOME: give it what `farmhand init` would."""
    prepare_home(tmp_path)


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    with WebhookSink() as running:
        yield running


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    return env


def cli(home: Path, *args: str) -> Any:
    done = subprocess.run(
        [FARMHAND, *args, "--json"], env=env_for(home), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def submit_slow(home: Path, sink: WebhookSink, count: int, ms: int) -> None:
    for i in range(count):
        payload = json.dumps({"url": f"{sink.url}/slow?ms={ms}"})
        cli(home, "submit", "webhook.post", "--key", f"slow-{i}", "--payload", payload)


@contextlib.contextmanager
def executor_process(home: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A real executor process, killed at the end whatever happened."""
    process = subprocess.Popen(
        [FARMHAND, "executor", "run", *args],
        env=env_for(home),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def wait_running(home: Path, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = cli(home, "list", "--state", "running")
        if len([i for i in running if i["attempts"] >= 1]) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} attempts never started")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_in_flight_calls_finish_within_grace(
    tmp_path: Path, sink: WebhookSink, signum: signal.Signals
) -> None:
    submit_slow(tmp_path, sink, count=4, ms=1000)
    with executor_process(tmp_path, "--concurrency", "2", "--grace", "10") as executor:
        wait_running(tmp_path, 2)
        executor.send_signal(signum)
        _, err = executor.communicate(timeout=30)
    assert executor.returncode == 0, err
    states = sorted(i["state"] for i in cli(tmp_path, "list"))
    # the two calls in flight finished and wrote receipts; the other two were never claimed
    assert states == ["pending", "pending", "succeeded", "succeeded"], err
    assert len(sink.effects()) == 2


def test_calls_past_grace_are_left_for_reconciliation(tmp_path: Path, sink: WebhookSink) -> None:
    # the call outlasts everything here; the executor's own call timeout is half the lease
    # TTL (4 s), so SIGTERM lands while the call is still in flight
    submit_slow(tmp_path, sink, count=1, ms=30_000)
    with executor_process(tmp_path, "--grace", "0.2", "--lease-ttl", "8") as executor:
        wait_running(tmp_path, 1)
        started = time.monotonic()
        executor.send_signal(signal.SIGTERM)
        _, err = executor.communicate(timeout=30)
        stopped_after = time.monotonic() - started
    assert executor.returncode == 0, err
    assert stopped_after < 3.5, "the executor waited for the call instead of its grace period"
    (intent,) = cli(tmp_path, "list")
    # no receipt: the attempt's outcome is unknown to us, so it stays leased until it expires
    assert intent["state"] == "running", err
    assert intent["receipts"] == []
    # the next executor takes the expired lease over and, as the default account does not
    # honour Idempotency-Key, parks the intent in `unknown` instead of calling again
    drained = subprocess.run(
        [FARMHAND, "executor", "run", "--drain"],
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drained.returncode == 0, drained.stderr
    after = cli(tmp_path, "status", intent["id"])
    assert after["state"] == "unknown"
    assert "interrupted" in after["reason"]
    assert [r["outcome"] for r in after["receipts"]] == ["unknown"]
