"""What only the PostgreSQL store does: migrations under an advisory lock, the server's clock,
LISTEN/NOTIFY wake-ups (from other stores, other writers, after a lost connection) and
passwords kept out of URLs and messages. The shared contract is in tests/contract/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backends import fresh_postgres_url
from farmhand.clock import FakeClock
from farmhand.config import Limit
from farmhand.contracts import Intent, IntentState
from farmhand.errors import InvalidInput, InvalidTransition, StoreError
from farmhand.store import Change, Claim, NewIntent, Store, open_store
from farmhand.store.base import Admitted, Bucket, Guard, Held
from farmhand.store.postgres import PostgresStore
from farmhand.store.postgres_setup import latest_version, mask
from farmhand.testing.servers import LocalPostgres
from store_support import gate, make_intent, put

SECRET = "s3cret-pass"


@pytest.fixture
def db_url(postgres_server: LocalPostgres | str) -> str:
    return fresh_postgres_url(postgres_server)


@pytest.fixture
async def pg(db_url: str) -> AsyncIterator[PostgresStore]:
    """A store on the server's clock."""
    store = await PostgresStore.open(db_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def other(db_url: str) -> AsyncIterator[Store]:
    """A second store on the same database (another executor), on the server's clock too."""
    store = await open_store(db_url)
    try:
        yield store
    finally:
        await store.close()


async def server_now(url: str) -> float:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        row = await cur.fetchone()
    assert row is not None
    return float(row[0])


async def test_concurrent_first_opens_migrate_once(postgres_server: LocalPostgres | str) -> None:
    url = fresh_postgres_url(postgres_server, empty=True)
    stores = await asyncio.gather(*(PostgresStore.open(url) for _ in range(4)))
    for store in stores:
        await store.close()
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT version FROM farmhand_migrations ORDER BY version")
        versions = [v for (v,) in await cur.fetchall()]
    assert versions == list(range(1, latest_version() + 1))


async def test_newer_schema_is_refused(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO farmhand_migrations (version) VALUES (%s)", (999,))
    with pytest.raises(StoreError, match="schema version 999, newer than this farmhand") as info:
        await open_store(db_url)
    assert "\n" not in str(info.value)


async def test_foreign_tables_are_named_in_the_error(postgres_server: LocalPostgres | str) -> None:
    url = fresh_postgres_url(postgres_server, empty=True)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE intents (id int)")
    with pytest.raises(StoreError, match="tables farmhand did not create"):
        await open_store(url)


def test_passwords_are_masked() -> None:
    assert mask(f"postgresql://u:{SECRET}@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask(f"postgres://h/db?sslmode=require&password={SECRET}") == (
        "postgres://h/db?sslmode=require&password=***"
    )
    assert mask("postgresql://u@h/db") == "postgresql://u@h/db"
    assert SECRET not in mask(f"postgresql:u:{SECRET}@h/db")


async def test_url_of_an_open_store_has_no_password(db_url: str) -> None:
    with_password = db_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    store = await open_store(with_password)
    try:
        assert SECRET not in store.url
        assert SECRET not in repr(store.url)
        assert store.url.startswith("postgresql://postgres:***@")
    finally:
        await store.close()


async def test_bad_pool_size_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="pool_size must be a whole number"):
        await open_store("postgresql://h/db?pool_size=0")


async def test_server_clock_without_a_clock(pg: PostgresStore, db_url: str) -> None:
    fake = FakeClock(start=1_000_000_000.0)  # far from now: only builds the intent
    before = await server_now(db_url)
    await put(pg, make_intent(fake, "k"))
    (claim,) = await pg.claim("ex_a", 10, 30.0, [])
    after = await server_now(db_url)
    status = await pg.get_intent("k")
    assert status is not None
    assert before <= status.updated_at.timestamp() <= after
    assert before + 30.0 <= claim.lease.expires_at.timestamp() <= after + 30.0
    (attempt,) = await pg.start_attempts([claim.lease])
    assert attempt is not None
    assert before <= attempt.started_at.timestamp() <= await server_now(db_url)
    (throttle,) = await pg.take([[]])
    assert throttle.wait == 0.0


async def test_other_writers_wake_a_waiter(pg: PostgresStore, db_url: str) -> None:
    clock = FakeClock()
    other = await open_store(db_url, clock)
    try:
        since = await pg.change_counter()
        waiter = asyncio.create_task(pg.wait_for_change(since, 10.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = time.monotonic()
        await put(other, make_intent(clock, "k"))
        await asyncio.wait_for(waiter, 5.0)
        assert time.monotonic() - started < 2.0
        assert await pg.change_counter() != since
    finally:
        await other.close()


async def test_writers_outside_farmhand_wake_a_waiter(pg: PostgresStore, db_url: str) -> None:
    await put(pg, make_intent(FakeClock(), "k"))
    since = await pg.change_counter()
    waiter = asyncio.create_task(pg.wait_for_change(since, 10.0))
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("UPDATE intents SET ready_at = ready_at - 1")
    await asyncio.wait_for(waiter, 5.0)


async def test_own_commits_count_once_and_idle_claims_not_at_all(pg: PostgresStore) -> None:
    clock = FakeClock()
    before = await pg.change_counter()
    await put(pg, make_intent(clock, "k"))
    await asyncio.sleep(0.2)  # the NOTIFY of that commit has come back by now
    assert await pg.change_counter() == before + 1
    await pg.claim("ex_a", 10, 30.0, [])
    after_claim = await pg.change_counter()
    assert await pg.claim("ex_b", 10, 30.0, []) == []
    await pg.wait_for_change(after_claim, 0.2)
    assert await pg.change_counter() == after_claim


async def lease_one_through(store: Store, owner: str) -> Claim:
    """Claim the two intents put, take the first through start, renewal and success;
    the second's claim."""
    first, second = await store.claim(owner, 10, 30.0, [])
    (attempt,) = await store.start_attempts([first.lease])
    assert attempt is not None
    (lease,) = await store.renew([first.lease], 30.0)
    assert lease is not None
    done = Change(first.intent.id, IntentState.SUCCEEDED, owner, "succeed", token=lease.token)
    assert await store.apply([done]) == [True]
    return second


async def release(store: Store, claim: Claim) -> None:
    """Give ``claim``'s intent back (pending), as an executor does with what it cannot run."""
    back = Change(
        claim.intent.id, IntentState.PENDING, claim.lease.owner, "release", token=claim.lease.token
    )
    assert await store.apply([back]) == [True]


async def test_leases_taken_started_renewed_or_ended_elsewhere_wake_no_one(
    pg: PostgresStore, other: Store
) -> None:
    clock = FakeClock()
    before = await pg.change_counter()
    await put(other, make_intent(clock, "a"), make_intent(clock, "b"))
    await pg.wait_for_change(before, 5.0)  # that submit's NOTIFY has arrived
    since = await pg.change_counter()
    assert since != before
    # an outcome, even the one that ends the last lease, makes nothing claimable
    second = await lease_one_through(other, "ex_b")
    await pg.wait_for_change(since, 0.3)
    assert await pg.change_counter() == since
    # a release does: that wakes waiters
    waiter = asyncio.create_task(pg.wait_for_change(since, 10.0))
    await release(other, second)
    await asyncio.wait_for(waiter, 5.0)
    assert await pg.change_counter() != since


async def test_tokens_taken_wake_no_one_and_a_pause_does(pg: PostgresStore, other: Store) -> None:
    clock = FakeClock()
    bucket = Bucket("account:default", Limit(rate=1.0, burst=10))
    taking = Guard("noop", "default", take=(bucket,))
    await put(other, make_intent(clock, "a"))
    (claim,) = await other.claim("ex_b", 10, 30.0, [])
    await other.take([(bucket,)])  # the bucket's first take creates its row
    await asyncio.sleep(0.2)  # every NOTIFY so far has come back by now
    since = await pg.change_counter()
    # tokens taken elsewhere, alone or with a start, and here
    assert (await other.take([(bucket,)]))[0].wait == 0.0
    (started,) = await other.start_attempts([claim.lease], [taking])
    assert isinstance(started, Admitted)
    assert (await pg.take([(bucket,)]))[0].wait == 0.0
    await pg.wait_for_change(since, 0.3)
    assert await pg.change_counter() == since
    # a pause is news for every executor
    waiter = asyncio.create_task(pg.wait_for_change(since, 10.0))
    await other.pause(bucket.name, time.time() + 30, "HTTP 429", "ex_b")
    await asyncio.wait_for(waiter, 5.0)
    assert await pg.change_counter() != since


async def test_its_own_leases_and_outcomes_do_not_wake_this_store(pg: PostgresStore) -> None:
    # an executor that claims, starts and finishes must not wake itself for a claim that
    # finds nothing; its own release must (it gave work back)
    clock = FakeClock()
    await put(pg, make_intent(clock, "a"), make_intent(clock, "b"))
    await asyncio.sleep(0.2)  # the NOTIFY of that commit has come back by now
    since = await pg.change_counter()
    second = await lease_one_through(pg, "ex_a")
    assert await pg.change_counter() == since
    await release(pg, second)
    assert await pg.change_counter() != since


async def test_an_empty_claim_answers_the_next_readiness_in_the_same_round_trip(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    await put(
        pg,
        make_intent(clock, "later", not_before=clock.now() + 60),
        make_intent(clock, "mail", kind="email.send"),
    )
    closed = [gate(clock, kind="email.send")]
    statements: list[str] = []
    real = pg._rows

    async def counted(sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        statements.append(sql)
        return await real(sql, params)

    monkeypatch.setattr(pg, "_rows", counted)
    assert await pg.claim("ex_a", 10, 30.0, closed) == []
    kept = await pg.readiness(closed)
    assert len(statements) == 1  # the claim's own
    assert kept == await pg.readiness(closed)  # asked again: read, with the same answer
    assert len(statements) == 2
    assert kept.running == 0
    assert kept.next_ready_at == clock.now() + 60  # the gated intent is not counted
    # other gates than the claim's: read
    assert await pg.claim("ex_a", 10, 30.0, closed) == []
    ungated = (await pg.readiness([])).next_ready_at
    assert ungated is not None
    assert kept.next_ready_at is not None
    assert ungated < kept.next_ready_at  # the mail intent, ready since its submit, counts
    assert len(statements) == 4


async def test_a_version_1_database_is_upgraded_in_place(
    postgres_server: LocalPostgres | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farmhand.store import postgres_setup

    url = fresh_postgres_url(postgres_server, empty=True)
    first = postgres_setup.migrations()[:1]
    clock = FakeClock()
    with monkeypatch.context() as patch:
        patch.setattr(postgres_setup, "migrations", lambda: first)
        old = await open_store(url, clock)
        try:
            await put(old, make_intent(clock, "waiting"))
            await put(old, make_intent(clock, "running"))
            claims = await old.claim("ex_old", 1, 30.0, [])
        finally:
            await old.close()
    store = await open_store(url, clock)
    try:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT version FROM farmhand_migrations ORDER BY version")
            assert [v for (v,) in await cur.fetchall()] == list(range(1, latest_version() + 1))
        (held,) = claims
        (attempt,) = await store.start_attempts([held.lease])
        assert attempt is not None
        done = Change(
            held.intent.id, IntentState.SUCCEEDED, "ex_old", "succeed", token=held.lease.token
        )
        assert await store.apply([done]) == [True]
        (claim,) = await store.claim("ex_new", 10, 30.0, [])
        assert claim.intent.key != held.intent.key
        assert await store.counts() == {IntentState.SUCCEEDED: 1, IntentState.RUNNING: 1}
    finally:
        await store.close()


async def test_listener_reconnects_after_losing_its_connection(
    pg: PostgresStore, db_url: str
) -> None:
    clock = FakeClock()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        )
    since = await pg.change_counter()
    await pg.wait_for_change(since, 5.0)  # losing it counts as a change: re-check the store
    other = await open_store(db_url, clock)
    try:
        for attempt in range(50):  # until the listener is back
            since = await pg.change_counter()
            await put(other, make_intent(clock, f"k{attempt}"))
            await pg.wait_for_change(since, 0.2)
            if await pg.change_counter() != since:
                break
        else:
            pytest.fail("no notification arrived after the listener's connection was lost")
    finally:
        await other.close()


async def test_closed_store_says_so(db_url: str) -> None:
    store = await open_store(db_url)
    await store.close()
    with pytest.raises(StoreError, match="is closed"):
        await store.gates()
    with pytest.raises(StoreError, match="is closed"):
        await store.wait_for_change(0, 0.1)


async def _repeats(store: Store, clock: FakeClock) -> tuple[object, ...]:
    """Batches that name one intent more than once, each change depending on the one
    before; what they did, in a form two stores can be compared by."""
    first, second = make_intent(clock, "first"), make_intent(clock, "second")
    await put(store, first)
    await put(store, second)
    S = IntentState

    def change(intent: Intent, to: IntentState, *frm: IntentState, extra: int = 0) -> Change:
        return Change(
            intent_id=intent.id,
            to_state=to,
            actor="human:ops",
            action=f"to_{to}",
            from_states=frm,
            extra_attempts=extra,
        )

    results = await store.apply(
        [
            change(first, S.DEAD, S.PENDING),
            change(second, S.CANCELLED, S.PENDING),
            change(first, S.PENDING, S.DEAD, extra=2),
            change(first, S.DEAD, S.RUNNING),  # no longer holds: first is pending again
            change(first, S.CANCELLED, S.PENDING),
        ]
    )
    status = await store.get_intent(first.id)
    assert status is not None
    history = [(e.action, e.from_state, e.to_state) for e in reversed(await store.audit(first.id))]
    third = make_intent(clock, "third")
    await put(store, third)
    # legal in the first round, illegal in the second: nothing of the batch stays
    with pytest.raises(InvalidTransition, match="is dead; it cannot become succeeded"):
        await store.apply([change(third, S.DEAD, S.PENDING), change(third, S.SUCCEEDED, S.DEAD)])
    third_status = await store.get_intent(third.id)
    assert third_status is not None
    assert third_status.state is S.PENDING
    # one lease given twice starts two attempts, one after the other
    (claim,) = await store.claim("ex_a", 10, 30.0, [])
    started = await store.start_attempts([claim.lease, claim.lease])
    attempts = [a.attempt if a else None for a in started]
    return results, status.state, status.max_attempts, history, attempts, await store.counts()


async def test_a_batch_naming_an_intent_twice_applies_in_order(db_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    pg = await open_store(db_url, clock)
    reference = await open_store(f"sqlite://{tmp_path}/farmhand.db", clock)
    try:
        assert await _repeats(pg, clock) == await _repeats(reference, clock)
    finally:
        await pg.close()
        await reference.close()


async def test_one_key_submitted_through_two_stores_at_once(db_url: str) -> None:
    clock = FakeClock()
    stores = [await open_store(db_url, clock) for _ in range(2)]
    try:
        for round_ in range(20):
            intents = [make_intent(clock, f"race-{round_}") for _ in stores]
            answers = await asyncio.gather(
                *(
                    store.put_intents([NewIntent(intent, IntentState.PENDING, "agent:test")])
                    for store, intent in zip(stores, intents, strict=True)
                )
            )
            (first,), (second,) = answers
            assert sorted([first[1], second[1]]) == [False, True]
            assert first[0].id == second[0].id
            assert first[0].id in {intent.id for intent in intents}
    finally:
        for store in stores:
            await store.close()


# -- starts that take tokens ------------------------------------------------------------


def taking(name: str, burst: int) -> Guard:
    return Guard("noop", "default", take=(Bucket(name, Limit(rate=1.0, burst=burst)),))


async def test_a_start_takes_its_token_at_its_start_on_the_server_clock(
    pg: PostgresStore, db_url: str
) -> None:
    await put(pg, make_intent(FakeClock(), "k"))
    (claim,) = await pg.claim("ex_a", 10, 30.0, [])
    before = await server_now(db_url)
    (started,) = await pg.start_attempts([claim.lease], [taking("account:default", 2)])
    assert isinstance(started, Admitted)
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT a.started_at, b.tat FROM attempts a, buckets b WHERE b.name = %s",
            ("account:default",),
        )
        row = await cur.fetchone()
    assert row is not None
    at, tat = row
    # one timeline: the token (a fresh bucket's tat is now + 1 / rate) and the start
    assert tat == at + 1.0
    assert before <= at <= await server_now(db_url)


async def test_starts_through_two_stores_share_one_bucket(db_url: str) -> None:
    clock = FakeClock()
    stores = [await open_store(db_url, clock) for _ in range(2)]
    try:
        guard = taking("account:default", 2)
        for round_ in range(5):
            clock.advance(2.0)  # the burst back (after the first round, with its row)
            await put(stores[0], *(make_intent(clock, f"r{round_}-{n}") for n in range(6)))
            claims = await stores[0].claim("ex_a", 6, 30.0, [])
            answers = await asyncio.gather(
                *(
                    store.start_attempts([c.lease for c in half], [guard] * len(half))
                    for store, half in zip(stores, (claims[:3], claims[3:]), strict=True)
                )
            )
            results = [r for answer in answers for r in answer]
            # the bucket's row lock orders the two: two tokens, whoever got them
            assert sum(isinstance(r, Admitted) for r in results) == 2
            assert sum(isinstance(r, Held) and r.by == "limited" for r in results) == 4
    finally:
        for store in stores:
            await store.close()


async def test_a_taking_batch_naming_an_intent_twice_starts_it_twice(pg: PostgresStore) -> None:
    await put(pg, make_intent(FakeClock(), "k"))
    (claim,) = await pg.claim("ex_a", 10, 30.0, [])
    started = await pg.start_attempts([claim.lease] * 3, [taking("account:default", 2)] * 3)
    first, second, third = started
    assert isinstance(first, Admitted)
    assert isinstance(second, Admitted)
    assert (first.attempt.attempt, second.attempt.attempt) == (1, 2)
    assert first.attempt.started_at == second.attempt.started_at
    assert isinstance(third, Held)
    assert third.by == "limited"
