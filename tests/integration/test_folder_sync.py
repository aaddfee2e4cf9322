"""Two machines on one synced folder store: the brain writes to its copy, the executor host
to its own, and a copier keeps them in step the way a sync tool does at its worst: late, in
any order, some files twice (also after the first copy was read), with Syncthing temporary
files and ``.sync-conflict-`` copies dropped in between.

A real executor runs on the executor host's copy against a real loopback webhook sink that
counts effects per Idempotency-Key. What must hold: nothing is lost (every intent reaches a
terminal state, the same on both copies), nothing is done twice (one effect per key), and
cancels and gates written on the brain's copy take effect on the executor host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from farmhand.clock import SystemClock
from farmhand.config import Settings
from farmhand.contracts import IntentState, IntentStatus
from farmhand.contracts.base import utc
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidTransition, StoreError
from farmhand.executor import Executor
from farmhand.keys import Keyring
from farmhand.store import IntentQuery
from farmhand.store.folder import FolderStore
from farmhand.store.folder_files import sync_debris
from farmhand.testing.sink import WebhookSink

S = IntentState
#: longest a scenario may take to settle before the test says what is stuck
SETTLE = 60.0


class Copier:
    """Keeps two copies of a folder in step like a sync tool, badly on purpose.

    A file goes only from the copy of the node that wrote it (its path names the node;
    executor_gate.json names its writer inside), as a version-tracking sync tool would.
    """

    def __init__(self, copies: dict[str, Path], seed: int) -> None:
        self.copies = copies
        self.rng = random.Random(seed)
        self.delivered = self.duplicates = self.debris = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copier", daemon=True)

    def __enter__(self) -> Copier:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def flush(self) -> None:
        """Deliver everything still missing, in order, now."""
        for src_node, src in self.copies.items():
            for dst_node, dst in self.copies.items():
                if dst_node != src_node:
                    for rel in self._missing(src_node, src, dst):
                        self._copy(src / rel, dst / rel)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.002, 0.03)):
            self._round()

    def _writer(self, root: Path, rel: Path) -> str | None:
        if rel.parts == ("executor_gate.json",):
            try:
                return str(json.loads((root / rel).read_text())["writer"])
            except (OSError, ValueError, KeyError):
                return None
        return rel.parts[1] if len(rel.parts) == 3 else None

    def _missing(self, node: str, src: Path, dst: Path) -> list[Path]:
        out = []
        for path in src.rglob("*"):
            rel = path.relative_to(src)
            if not path.is_file() or sync_debris(path.name) or self._writer(src, rel) != node:
                continue
            target = dst / rel
            if not target.exists() or target.read_bytes() != path.read_bytes():
                out.append(rel)
        return out

    def _copy(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f".syncthing.{target.name}.tmp"
        shutil.copyfile(source, temp)
        os.replace(temp, target)
        self.delivered += 1

    def _round(self) -> None:
        rng = self.rng
        for src_node, src in self.copies.items():
            for dst_node, dst in self.copies.items():
                if dst_node == src_node:
                    continue
                pending = self._missing(src_node, src, dst)
                rng.shuffle(pending)
                for rel in pending[: rng.randint(0, 6)]:  # some now, the rest later
                    self._copy(src / rel, dst / rel)
                present = [p for p in dst.rglob("*.json") if p.name[0].isdigit()]
                if present and rng.random() < 0.3:
                    # the same file delivered again, usually long after it was read
                    again = rng.choice(present)
                    rel = again.relative_to(dst)
                    if (src / rel).exists():
                        self._copy(src / rel, again)
                        self.duplicates += 1
                if present and rng.random() < 0.2:
                    self._litter(rng.choice(present))

    def _litter(self, beside: Path) -> None:
        """Leave what Syncthing leaves: a temporary file mid-transfer, a conflict copy."""
        body = beside.read_bytes()
        stem = beside.name.removesuffix(".json")
        if self.rng.random() < 0.5:
            name = f".syncthing.{stem}.json.tmp"
            (beside.parent / name).write_bytes(body[: len(body) // 2])
        else:
            name = f"{stem}.sync-conflict-20250101-120000-ABCDEFG.json"
            (beside.parent / name).write_bytes(body)
        self.debris += 1


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    with WebhookSink() as running:
        yield running


@pytest.fixture
async def machines(tmp_path: Path) -> AsyncIterator[tuple[FolderStore, FolderStore]]:
    """The brain's and the executor host's copies of the folder, each opened by its node."""
    clock = SystemClock()
    brain = await FolderStore.open(f"folder://{tmp_path}/brain-copy?node=brain", clock)
    hands = await FolderStore.open(f"folder://{tmp_path}/hands-copy?node=hands", clock)
    try:
        yield brain, hands
    finally:
        await brain.close()
        await hands.close()


def brain_coordinator(brain: FolderStore, settings: Settings) -> Coordinator:
    signer = Keyring(settings.home / "keys").signer("coordinator")
    return Coordinator(brain, SystemClock(), policy=settings.policy, signer=signer)


@contextlib.asynccontextmanager
async def executor_on(hands: FolderStore, settings: Settings) -> AsyncIterator[Executor]:
    executor = Executor(hands, settings, executor_id="ex_hands", concurrency=8)
    task = asyncio.create_task(executor.run())
    try:
        yield executor
    finally:
        executor.stop()
        await asyncio.wait_for(task, 30)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = SETTLE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def everything(store: FolderStore) -> dict[str, IntentStatus]:
    return {s.key: s for s in await store.list_intents(IntentQuery(limit=100_000))}


def summary(statuses: dict[str, IntentStatus]) -> dict[str, tuple[str, str, int, list[str]]]:
    return {
        key: (s.id, s.state.value, s.attempts, [r.id for r in s.receipts])
        for key, s in statuses.items()
    }


async def settled(brain: FolderStore, hands: FolderStore, keys: set[str]) -> bool:
    """Every key terminal, and both copies agree on everything."""
    mine, theirs = await everything(brain), await everything(hands)
    if set(mine) != keys or set(theirs) != keys:
        return False
    if not all(s.state.terminal for s in mine.values()):
        return False
    return summary(mine) == summary(theirs)


def post(
    sink: WebhookSink, key: str, account: str = "default", not_before: datetime | None = None
) -> SubmitRequest:
    payload = {"url": f"{sink.url}/ok", "json": {"key": key}}
    return SubmitRequest(
        kind="webhook.post", key=key, payload=payload, account=account, not_before=not_before
    )


async def test_nothing_lost_nothing_twice_and_cancels_hold(
    machines: tuple[FolderStore, FolderStore], settings: Settings, sink: WebhookSink
) -> None:
    brain, hands = machines
    coordinator = brain_coordinator(brain, settings)
    copier = Copier({"brain": brain.root, "hands": hands.root}, seed=11)
    later = utc(SystemClock().now()) + timedelta(seconds=4)
    keys: set[str] = set()
    cancelled_early: list[str] = []
    raced: list[str] = []
    with copier:
        async with executor_on(hands, settings):
            for i in range(80):
                key = f"order-{i:03d}"
                await coordinator.submit(post(sink, key))
                keys.add(key)
                if i % 10 == 3:
                    # cancelled at once: it may or may not have been claimed already
                    with contextlib.suppress(InvalidTransition):
                        await coordinator.cancel(key, "human:ops", "changed my mind")
                    raced.append(key)
                await asyncio.sleep(random.Random(i).uniform(0, 0.01))
            for i in range(10):
                key = f"later-{i}"
                await coordinator.submit(post(sink, key, not_before=later))
                await coordinator.cancel(key, "human:ops", "not needed")
                keys.add(key)
                cancelled_early.append(key)
            await until("every intent terminal on both copies", lambda: settled(brain, hands, keys))
    copier.flush()
    mine, theirs = await everything(brain), await everything(hands)
    assert summary(mine) == summary(theirs)
    effects = sink.effects()
    calls_per_key: dict[str, int] = {}
    for call in sink.calls():
        assert call.key is not None
        calls_per_key[call.key] = calls_per_key.get(call.key, 0) + 1
    for key, status in mine.items():
        if status.state is S.SUCCEEDED:
            assert calls_per_key.get(key) == 1, key  # nothing done twice
            assert effects[key].effect
            (receipt,) = status.receipts
            assert receipt.external_id is not None
        else:
            # a cancel only ever wins where no attempt had started, so nothing was sent
            assert status.state is S.CANCELLED, (key, status.state)
            assert key not in calls_per_key
    assert sink.repeated_calls() == 0
    external = [s.receipts[0].external_id for s in mine.values() if s.state is S.SUCCEEDED]
    assert len(set(external)) == len(external) == len(effects)
    assert all(mine[key].state is S.CANCELLED for key in cancelled_early)
    assert {mine[k].state for k in keys - set(raced) - set(cancelled_early)} == {S.SUCCEEDED}
    # the copier really was as bad as promised
    assert copier.duplicates > 0
    assert copier.debris > 0
    # a cancel that lost its race is in the audit of both copies, never silently dropped
    for key in raced:
        if mine[key].state is S.SUCCEEDED:
            audit = await brain.audit(mine[key].id)
            actions = {e.action for e in audit}
            assert "conflict.lost" in actions or "cancel" not in actions


async def test_gates_set_on_the_brain_hold_the_executor_host(
    machines: tuple[FolderStore, FolderStore], settings: Settings, sink: WebhookSink
) -> None:
    brain, hands = machines
    coordinator = brain_coordinator(brain, settings)
    ack = brain.root / "executor_gate.json"

    def acknowledged(closed: bool) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            try:
                rules = json.loads(ack.read_text())["rules"]
            except (OSError, ValueError):
                return False
            return any(r["account"] == "held" and r["open"] is not closed for r in rules)

        return check

    with Copier({"brain": brain.root, "hands": hands.root}, seed=5):
        async with executor_on(hands, settings):
            await coordinator.set_gate(False, "human:ops", account="held", reason="audit")
            # the executor host says, in the file only it writes, that it obeys the gate
            await until("the executor host's acknowledgement", acknowledged(True))
            held = {f"held-{i}" for i in range(8)}
            free = {f"free-{i}" for i in range(4)}
            for key in sorted(held):
                await coordinator.submit(post(sink, key, account="held"))
            for key in sorted(free):
                await coordinator.submit(post(sink, key))

            async def free_done() -> bool:
                found = await everything(brain)
                return all(k in found and found[k].state is S.SUCCEEDED for k in free)

            await until("the ungated intents", free_done)
            await asyncio.sleep(0.5)
            for store in (brain, hands):
                found = await everything(store)
                assert {found[k].state for k in held} == {S.PENDING}
            assert not held & set(sink.effects())

            await coordinator.set_gate(True, "human:ops", account="held", reason="done")
            await until("the reopened gate's acknowledgement", acknowledged(False))
            await until("the held intents", lambda: settled(brain, hands, held | free))
    assert set(sink.effects()) == held | free
    assert len(sink.calls()) == len(held | free)


async def test_a_second_executor_host_is_refused(
    machines: tuple[FolderStore, FolderStore], settings: Settings, sink: WebhookSink
) -> None:
    brain, hands = machines
    coordinator = brain_coordinator(brain, settings)
    copier = Copier({"brain": brain.root, "hands": hands.root}, seed=3)
    await coordinator.submit(post(sink, "one"))
    copier.flush()
    async with executor_on(hands, settings):
        await until(
            "the first executor host's marker",
            lambda: asyncio.to_thread((hands.root / "state/hands/executor.json").exists),
        )
    copier.flush()
    second = Executor(brain, settings, executor_id="ex_brain", drain=True)
    with pytest.raises(StoreError, match=r"node 'hands'.*postgresql:// or redis://"):
        await asyncio.wait_for(second.run(), 30)
    # every other write of the brain still works
    await coordinator.submit(post(sink, "two"))
    assert (await coordinator.cancel("two", "human:ops")).state is S.CANCELLED
