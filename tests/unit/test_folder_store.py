"""The folder store beyond the conformance suite: URLs and node ids, the one-writer layout,
what readers skip, incremental reads, and how concurrent writes of two nodes merge.

Two machines are two roots here, kept in step by :func:`deliver`, which copies files the way
a sync tool does (temporary name, then rename) in whatever order the test wants.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from farmhand import secrets
from farmhand.clock import FakeClock
from farmhand.config import Settings
from farmhand.contracts import IntentState, Outcome
from farmhand.contracts.base import utc
from farmhand.errors import InvalidInput, StoreError
from farmhand.store import Change, IntentQuery, NewIntent, folder_journal, open_store
from farmhand.store.folder import FolderStore
from farmhand.store.folder_files import sync_debris
from farmhand.store.folder_journal import node_id, parse_url
from store_support import gate, make_intent, receipt_for

S = IntentState
TTL = 30.0


def record_files(root: Path) -> list[Path]:
    """Every file a sync tool would carry: records, markers and the gate file."""
    return sorted(
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and not sync_debris(p.name)
    )


def deliver(src: Path, dst: Path, only: list[Path] | None = None) -> list[Path]:
    """Copy the files of ``src`` that ``dst`` lacks (or that differ), temp name then rename."""
    copied = []
    for rel in only if only is not None else record_files(src):
        source, target = src / rel, dst / rel
        if target.exists() and target.read_bytes() == source.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f".syncthing.{target.name}.tmp"
        shutil.copyfile(source, temp)
        os.replace(temp, target)
        copied.append(rel)
    return copied


async def folder(root: Path, node: str, clock: FakeClock) -> FolderStore:
    return await FolderStore.open(f"folder://{root}?node={node}", clock)


@pytest.fixture
async def two(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[FolderStore, FolderStore]]:
    """A brain and an executor host, each on its own copy of the folder."""
    brain = await folder(tmp_path / "brain", "brain", clock)
    hands = await folder(tmp_path / "hands", "hands", clock)
    try:
        yield brain, hands
    finally:
        await brain.close()
        await hands.close()


def sync(a: FolderStore, b: FolderStore) -> None:
    deliver(a.root, b.root)
    deliver(b.root, a.root)


async def snapshot(store: FolderStore) -> list[tuple[str, str, int, int, list[str]]]:
    listed = await store.list_intents(IntentQuery(limit=10_000))
    return [
        (s.id, s.state.value, s.attempts, s.lease_token, [r.id for r in s.receipts]) for s in listed
    ]


# -- URLs, node ids, layout ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("folder://shared/farmhand", "names host 'shared'"),
        ("folder:relative/path", "no absolute path"),
        ("folder:///srv/farmhand?nodes=a", "unknown parameter 'nodes'"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_url(url)


def test_url_forms() -> None:
    assert parse_url("folder:///srv/fh?node=brain") == (Path("/srv/fh"), "brain")
    assert parse_url("folder://localhost/srv/fh") == (Path("/srv/fh"), None)


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".hidden", "x.sync-conflict-1", "n" * 65, "a b"])
def test_unsafe_node_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="cannot name this machine's files"):
        node_id(bad, {})


def test_node_id_comes_from_url_then_environment() -> None:
    assert node_id("brain", {"FARMHAND_NODE": "other"}) == "brain"
    assert node_id(None, {"FARMHAND_NODE": "hands-1"}) == "hands-1"
    with pytest.raises(InvalidInput, match="from FARMHAND_NODE"):
        node_id(None, {"FARMHAND_NODE": "bad/name"})


async def test_every_file_is_written_by_the_node_in_its_path(
    tmp_path: Path, clock: FakeClock
) -> None:
    root = tmp_path / "shared"
    brain = await folder(root, "brain", clock)
    hands = await folder(root, "hands", clock)
    try:
        ids = [
            s.id
            for s, _ in await brain.put_intents(
                [NewIntent(make_intent(clock, "k"), S.PENDING, "a")]
            )
        ]
        (claim,) = await hands.claim("ex_1", 5, TTL, [])
        (attempt,) = await hands.start_attempts([claim.lease])
        assert attempt is not None
        receipt = receipt_for(claim, 1, Outcome.SUCCEEDED, clock)
        change = Change(
            intent_id=ids[0],
            to_state=S.SUCCEEDED,
            actor="ex_1",
            action="succeed",
            token=claim.lease.token,
            receipt=receipt,
        )
        assert await hands.apply([change]) == [True]
        await brain.set_gate(gate(clock, kind="noop"))
        assert [r.kind for r in await hands.gates()] == ["noop"]
    finally:
        await brain.close()
        await hands.close()
    files = record_files(root)
    assert Path("queues/brain/000000000001.json") in files
    assert Path("receipts/hands/000000000003.json") in files
    assert Path("state/hands/executor.json") in files
    for rel in files:
        data = json.loads((root / rel).read_text())
        if rel.name == "executor_gate.json":
            assert data["writer"] == "hands"  # the executor host is its one writer
            assert [r["kind"] for r in data["rules"]] == ["noop"]
        else:
            assert rel.parts[1] == data["node"]


async def test_one_node_id_on_two_machines_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "shared"
    (root / "state" / "brain").mkdir(parents=True)
    (root / "state" / "brain" / "node.json").write_text(
        json.dumps({"node": "brain", "machine": "another-machine", "host": "mini"})
    )
    with pytest.raises(StoreError, match=r"belongs to another machine \(mini\).*node=NAME"):
        await folder(root, "brain", clock)


async def test_a_second_executor_host_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "shared"
    hands = await folder(root, "hands", clock)
    other = await folder(root, "hands2", clock)
    try:
        await hands.put_intents([NewIntent(make_intent(clock, "k"), S.PENDING, "a")])
        assert len(await hands.claim("ex_1", 5, TTL, [])) == 1
        with pytest.raises(StoreError) as caught:
            await other.claim("ex_2", 5, TTL, [])
        message = str(caught.value)
        assert "node 'hands'" in message
        assert "postgresql://" in message
        assert "redis://" in message
        assert "\n" not in message
        # everything else still works from that node
        assert (await other.counts()) == {S.RUNNING: 1}
    finally:
        await hands.close()
        await other.close()


# -- what readers skip, and reading only what is new ------------------------------------------


async def test_sync_debris_and_partial_files_are_skipped(
    two: tuple[FolderStore, FolderStore], clock: FakeClock
) -> None:
    brain, hands = two
    await brain.put_intents([NewIntent(make_intent(clock, "a"), S.PENDING, "x")])
    (record,) = [p for p in record_files(brain.root) if p.parts[0] == "queues"]
    full = (brain.root / record).read_bytes()
    target = hands.root / record
    target.parent.mkdir(parents=True, exist_ok=True)
    debris = {
        ".syncthing.000000000001.json.tmp": full[:10],
        "~syncthing~000000000002.json.tmp": full,
        "000000000001.sync-conflict-20250101-120000-ABCDEFG.json": full,
        "notes.txt": b"hello",
        "000000000007.json": b'{"farmhand": "folder/1", "node": "brain", "seq": 7}',
    }
    for name, body in debris.items():
        (target.parent / name).write_bytes(body)
    target.write_bytes(full[: len(full) // 2])  # a writer that did not rename into place
    before = await hands.change_counter()
    assert await hands.counts() == {}
    assert await hands.change_counter() == before
    target.write_bytes(full)
    assert await hands.counts() == {S.PENDING: 1}
    assert await hands.change_counter() == before + 1


async def test_reads_are_incremental(
    two: tuple[FolderStore, FolderStore], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    brain, hands = two
    for i in range(30):
        await brain.put_intents([NewIntent(make_intent(clock, f"k{i}"), S.PENDING, "x")])
    deliver(brain.root, hands.root)
    reads: list[Path] = []
    real = folder_journal.read_json

    def counting(path: Path) -> object:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(folder_journal, "read_json", counting)
    assert (await hands.counts())[S.PENDING] == 30
    assert len(reads) == 30
    for _ in range(5):
        await hands.list_intents(IntentQuery())
        await hands.change_counter()
    assert len(reads) == 30
    # the same file delivered again (a sync tool re-sending it) is not read again
    (first,) = [p for p in record_files(brain.root) if p.name == "000000000001.json"]
    (hands.root / first).unlink()
    deliver(brain.root, hands.root, [first])
    await brain.put_intents([NewIntent(make_intent(clock, "new"), S.PENDING, "x")])
    deliver(brain.root, hands.root)
    assert (await hands.counts())[S.PENDING] == 31
    assert len(reads) == 31


async def test_no_op_calls_write_nothing(
    two: tuple[FolderStore, FolderStore], clock: FakeClock
) -> None:
    brain, _ = two
    before = record_files(brain.root)
    counter = await brain.change_counter()
    await brain.claim("ex_1", 5, TTL, [])  # nothing to claim (but now the executor host)
    await brain.apply(
        [
            Change(
                intent_id="in_x",
                to_state=S.CANCELLED,
                actor="t",
                action="c",
                from_states=(S.PENDING,),
            )
        ]
    )
    await brain.renew([], TTL)
    assert await brain.change_counter() == counter
    # becoming the executor host is the one write: its marker, and its (empty) gate mirror
    assert [p for p in record_files(brain.root) if p not in before] == [
        Path("executor_gate.json"),
        Path("state/brain/executor.json"),
    ]


# -- concurrent writes on two nodes ---------------------------------------------------------------


async def test_cancel_wins_over_a_claim_that_started_nothing(
    two: tuple[FolderStore, FolderStore], clock: FakeClock
) -> None:
    brain, hands = two
    ((status, _),) = await brain.put_intents([NewIntent(make_intent(clock, "k"), S.PENDING, "a")])
    sync(brain, hands)
    (claim,) = await hands.claim("ex_1", 5, TTL, [])
    cancel = Change(
        intent_id=status.id,
        to_state=S.CANCELLED,
        actor="human:ops",
        action="cancel",
        from_states=(S.PENDING,),
    )
    assert await brain.apply([cancel]) == [True]  # the brain has not seen the claim yet
    sync(brain, hands)
    for store in (brain, hands):
        assert (await store.get_intent("k")).state is S.CANCELLED  # type: ignore[union-attr]
    # the lease went with the claim: no attempt can start, so no call is made
    assert await hands.start_attempts([claim.lease]) == [None]
    assert await snapshot(brain) == await snapshot(hands)
    lost = [e for e in await hands.audit(status.id) if e.action == "conflict.lost"]
    assert [(e.detail["lost"], e.actor) for e in lost] == [("claim", "ex_1")]
    assert "raced with cancel by human:ops" in (lost[0].reason or "")


async def test_a_started_attempt_wins_over_a_racing_cancel(
    two: tuple[FolderStore, FolderStore], clock: FakeClock
) -> None:
    brain, hands = two
    ((status, _),) = await brain.put_intents([NewIntent(make_intent(clock, "k"), S.PENDING, "a")])
    sync(brain, hands)
    (claim,) = await hands.claim("ex_1", 5, TTL, [])
    assert (await hands.start_attempts([claim.lease]))[0] is not None
    cancel = Change(
        intent_id=status.id,
        to_state=S.CANCELLED,
        actor="human:ops",
        action="cancel",
        from_states=(S.PENDING,),
    )
    assert await brain.apply([cancel]) == [True]
    assert (await brain.get_intent("k")).state is S.CANCELLED  # type: ignore[union-attr]
    sync(brain, hands)
    # an effect may have happened: the executor's branch stands, the cancel is void
    for store in (brain, hands):
        assert (await store.get_intent("k")).state is S.RUNNING  # type: ignore[union-attr]
    receipt = receipt_for(claim, 1, Outcome.SUCCEEDED, clock)
    done = Change(
        intent_id=status.id,
        to_state=S.SUCCEEDED,
        actor="ex_1",
        action="succeed",
        token=claim.lease.token,
        receipt=receipt,
    )
    assert await hands.apply([done]) == [True]
    sync(brain, hands)
    assert await snapshot(brain) == await snapshot(hands)
    assert (await brain.get_intent("k")).state is S.SUCCEEDED  # type: ignore[union-attr]
    history = list(reversed(await brain.audit(status.id)))
    applied = [e.action for e in history if e.action != "conflict.lost"]
    assert applied == ["submit", "claim", "succeed"]
    (lost,) = [e for e in history if e.action == "conflict.lost"]
    assert (lost.detail["lost"], lost.actor) == ("cancel", "human:ops")
    assert "raced with claim by ex_1" in (lost.reason or "")


async def test_one_key_submitted_on_two_nodes_keeps_one_intent(
    two: tuple[FolderStore, FolderStore], clock: FakeClock
) -> None:
    brain, hands = two
    mine = make_intent(clock, "order-1", payload={"from": "brain"})
    theirs = make_intent(clock, "order-1", payload={"from": "hands"})
    await brain.put_intents([NewIntent(mine, S.PENDING, "a")])
    await hands.put_intents([NewIntent(theirs, S.PENDING, "b")])
    # the executor host runs the one it knows before the other arrives
    (claim,) = await hands.claim("ex_1", 5, TTL, [])
    await hands.start_attempts([claim.lease])
    sync(brain, hands)
    for store in (brain, hands):
        kept = await store.get_intent("order-1")
        assert kept is not None
        assert kept.id == theirs.id
        assert await store.get_intent(mine.id) is None
        assert (await store.counts()) == {S.RUNNING: 1}
    lost = [e for e in await brain.audit(mine.id) if e.action == "conflict.lost"]
    assert len(lost) == 1
    assert theirs.id in (lost[0].reason or "")


async def test_a_claim_on_a_losing_branch_never_shares_a_token(
    tmp_path: Path, clock: FakeClock
) -> None:
    brain1 = await folder(tmp_path / "b1", "brain1", clock)
    brain2 = await folder(tmp_path / "b2", "brain2", clock)
    hands = await folder(tmp_path / "h", "hands", clock)
    try:
        intent = make_intent(clock, "k")
        await brain1.put_intents([NewIntent(intent, S.AWAITING_APPROVAL, "a")])
        deliver(brain1.root, brain2.root)
        deliver(brain1.root, hands.root)
        for brain in (brain1, brain2):  # both approve before either sees the other
            approve = Change(
                intent_id=intent.id,
                to_state=S.PENDING,
                actor=brain.node,
                action="approve",
                from_states=(S.AWAITING_APPROVAL,),
            )
            assert await brain.apply([approve]) == [True]
        deliver(brain2.root, hands.root)
        (stale,) = await hands.claim("ex_1", 5, TTL, [])
        # brain1's approval sorts first and no attempt started: hands' claim is void
        deliver(brain1.root, hands.root)
        assert (await hands.get_intent("k")).state is S.PENDING  # type: ignore[union-attr]
        (fresh,) = await hands.claim("ex_1", 5, TTL, [])
        assert fresh.lease.token > stale.lease.token
        assert await hands.start_attempts([stale.lease]) == [None]
        assert await hands.renew([stale.lease], TTL) == [None]
        (attempt,) = await hands.start_attempts([fresh.lease])
        assert attempt is not None
    finally:
        for store in (brain1, brain2, hands):
            await store.close()


async def test_merge_does_not_depend_on_arrival_order(
    two: tuple[FolderStore, FolderStore], clock: FakeClock, tmp_path: Path
) -> None:
    brain, hands = two
    stored = await brain.put_intents(
        [NewIntent(make_intent(clock, f"k{i}"), S.PENDING, "a") for i in range(6)]
    )
    ids = [s.id for s, _ in stored]
    sync(brain, hands)
    claims = await hands.claim("ex_1", 3, TTL, [])
    await hands.start_attempts([c.lease for c in claims[:2]])
    for iid in ids[:4]:  # two race with started attempts, one with a bare claim, one is free
        await brain.apply(
            [
                Change(
                    intent_id=iid,
                    to_state=S.CANCELLED,
                    actor="ops",
                    action="cancel",
                    from_states=(S.PENDING,),
                )
            ]
        )
    await brain.set_gate(gate(clock, account="acme"))
    await hands.set_gate(gate(clock, account="acme").model_copy(update={"open": True}))
    sync(brain, hands)
    expected = await snapshot(brain)
    assert expected == await snapshot(hands)
    assert await brain.gates() == await hands.gates()
    assert [r.open for r in await brain.gates()] == [False]  # concurrent: closed wins
    files = [p for p in record_files(brain.root) if p.name[0].isdigit()]
    for round_ in range(5):
        rng = random.Random(round_)
        order = files[:]
        rng.shuffle(order)
        observer = await folder(tmp_path / f"observer{round_}", "observer", clock)
        try:
            for rel in order:  # one file at a time, reading in between
                deliver(brain.root, observer.root, [rel])
                await observer.counts()
            assert await snapshot(observer) == expected
            assert await observer.gates() == await brain.gates()
            audit = [(e.action, e.intent_id, e.actor) for e in await observer.audit(limit=1000)]
            assert audit == [
                (e.action, e.intent_id, e.actor) for e in await brain.audit(limit=1000)
            ]
        finally:
            await observer.close()


async def test_a_gate_set_after_reading_another_overrides_it(
    two: tuple[FolderStore, FolderStore], clock: FakeClock
) -> None:
    brain, hands = two
    closed = gate(clock)
    await hands.set_gate(closed)
    sync(brain, hands)
    clock.advance(-60)  # the brain's clock is behind: order comes from what was read, not time
    reopened = gate(clock).model_copy(update={"open": True, "actor": "brain-ops"})
    await brain.set_gate(reopened)
    sync(brain, hands)
    assert await hands.gates() == [reopened] == await brain.gates()
    # only the executor host writes executor_gate.json, and hands is not one yet
    assert not (hands.root / "executor_gate.json").exists()
    await hands.claim("ex_1", 1, TTL, [])
    ack = json.loads((hands.root / "executor_gate.json").read_text())
    assert (ack["writer"], ack["rules"][0]["open"]) == ("hands", True)


# -- secrets never in the shared folder -----------------------------------------------------------


def test_secrets_inside_the_folder_store_are_refused(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "Shared"
    path = root / "private" / "secrets.toml"
    path.parent.mkdir(parents=True)
    path.write_text('T = "CANARY-0123"\n', encoding="utf-8")
    path.chmod(0o600)
    moved = dataclasses.replace(settings, store_url=f"folder://{root}?node=hands")
    with pytest.raises(secrets.SecretsError, match="inside the shared folder store") as caught:
        secrets.load(moved, {"FARMHAND_SECRETS_FILE": str(path)})
    assert "CANARY" not in str(caught.value)
    # even when the folder store is the farmhand home itself
    home_store = dataclasses.replace(settings, store_url=f"folder://{settings.home}")
    assert secrets.location_problem(
        settings.home / "secrets.toml", settings.home, home_store.store_url
    )
    # beside it is fine
    assert (
        secrets.location_problem(tmp_path / "secrets.toml", settings.home, moved.store_url) is None
    )


async def test_open_store_dispatches_folder_urls(tmp_path: Path, clock: FakeClock) -> None:
    store = await open_store(f"folder://{tmp_path}/fh?node=n1", clock)
    try:
        assert isinstance(store, FolderStore)
        assert (store.node, store.url) == ("n1", f"folder://{tmp_path}/fh")
        ((status, created),) = await store.put_intents(
            [NewIntent(make_intent(clock, "k"), S.PENDING, "a")]
        )
        assert created
        assert status.updated_at == utc(clock.now())
    finally:
        await store.close()
