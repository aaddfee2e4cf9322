"""What only the Redis store does: namespaces, the server's clock, stream delivery with
XAUTOCLAIM in real time, wake-ups through the wake stream, optimistic token takes with an
attempt start, AOF durability across a crash, and passwords kept out of URLs and messages.
The shared contract is in tests/contract/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from backends import fresh_redis_url
from farmhand.canonical import payload_hash
from farmhand.clock import FakeClock
from farmhand.config import Limit
from farmhand.contracts import Intent, IntentState, Outcome, Receipt
from farmhand.contracts.base import utc
from farmhand.errors import InvalidInput, StoreError
from farmhand.ids import new_id
from farmhand.store import Change, Claim, IntentQuery, NewIntent, Store, open_store
from farmhand.store.base import Admitted, Bucket, Guard
from farmhand.store.redis import RedisStore
from farmhand.store.redis_setup import mask, parse
from farmhand.testing.servers import LocalRedis, free_port

S = IntentState
SECRET = "s3cret-pass"
SCOPE = "noop/default"


def make_intent(key: str, now: float | None = None) -> Intent:
    payload = {"key": key}
    return Intent(
        id=new_id("in"),
        key=key,
        kind="noop",
        payload=payload,
        payload_hash=payload_hash(payload),
        created_at=utc(now if now is not None else time.time()),
    )


async def put(store: Store, *keys: str) -> list[str]:
    stored = await store.put_intents(
        [NewIntent(make_intent(key), S.PENDING, "agent:test") for key in keys]
    )
    return [status.id for status, _ in stored]


def succeed(claim: Claim, attempt: int) -> Change:
    receipt = Receipt(
        id=new_id("rc"),
        intent_id=claim.intent.id,
        attempt=attempt,
        outcome=Outcome.SUCCEEDED,
        executor=claim.lease.owner,
        fencing_token=claim.lease.token,
        finished_at=utc(time.time()),
    )
    return Change(
        intent_id=claim.intent.id,
        to_state=S.SUCCEEDED,
        actor=claim.lease.owner,
        action="succeed",
        token=claim.lease.token,
        receipt=receipt,
    )


@pytest.fixture
def url(redis_server: LocalRedis | str) -> str:
    return fresh_redis_url(redis_server)


@pytest.fixture
async def rs(url: str) -> AsyncIterator[RedisStore]:
    """A store on the server's clock."""
    store = await RedisStore.open(url, None)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def raw(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the same server, to look at the keys."""
    client = aioredis.Redis.from_url(url.partition("?")[0], decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def key(store: RedisStore, name: str) -> str:
    return f"{{{store.namespace}}}:{name}"


# -- URLs and errors ----------------------------------------------------------------------


def test_passwords_are_masked() -> None:
    assert mask(f"redis://:{SECRET}@h:6379/0") == "redis://:***@h:6379/0"
    assert mask(f"rediss://app:{SECRET}@h/2?namespace=x") == "rediss://app:***@h/2?namespace=x"
    assert SECRET not in mask(f"redis://h/0?password={SECRET}")
    assert mask("redis://h:6379/0") == "redis://h:6379/0"


def test_namespace_is_farmhands_own_parameter() -> None:
    target = parse(f"redis://app:{SECRET}@h:7000/3?namespace=farm.a&socket_timeout=3")
    assert target.namespace == "farm.a"
    assert target.prefix == "{farm.a}:"
    assert "namespace" not in target.url
    assert "socket_timeout=3" in target.url
    assert target.where == "h:7000/3"
    assert SECRET not in target.display
    assert parse("redis://h").namespace == "farmhand"
    with pytest.raises(InvalidInput, match="namespace"):
        parse("redis://h/0?namespace=a}b")


async def test_unreachable_server_is_one_line_without_the_password() -> None:
    port = free_port()
    with pytest.raises(StoreError) as info:
        await open_store(f"redis://app:{SECRET}@127.0.0.1:{port}/0?namespace=x")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "start redis-server" in message
    assert SECRET not in message
    assert "\n" not in message


async def test_credentials_masked_and_refused_credentials_named() -> None:
    with LocalRedis(appendonly=False) as server:
        admin = aioredis.Redis.from_url(server.url)
        await admin.config_set("requirepass", SECRET)
        await admin.aclose()
        store = await open_store(f"redis://:{SECRET}@127.0.0.1:{server.port}/0")
        try:
            assert store.url == f"redis://:***@127.0.0.1:{server.port}/0"
            await put(store, "k")
            assert (await store.counts()) == {S.PENDING: 1}
        finally:
            await store.close()
        with pytest.raises(StoreError, match="credentials") as info:
            await open_store(f"redis://:wrong-{SECRET}@127.0.0.1:{server.port}/0")
        assert SECRET not in str(info.value)


async def test_unknown_key_layout_is_refused(url: str, raw: aioredis.Redis) -> None:
    store = await RedisStore.open(url, None)
    namespace = store.namespace
    await store.close()
    assert await raw.get(f"{{{namespace}}}:layout") == "1"
    await raw.set(f"{{{namespace}}}:layout", "2")
    with pytest.raises(StoreError, match="key layout 2"):
        await open_store(url)


async def test_closed_store_says_so(url: str) -> None:
    store = await open_store(url)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.claim("ex_a", 1, 30, [])


# -- namespaces ---------------------------------------------------------------------------


async def test_farms_in_two_namespaces_do_not_meet(
    redis_server: LocalRedis | str, raw: aioredis.Redis
) -> None:
    first = await RedisStore.open(fresh_redis_url(redis_server), None)
    second = await RedisStore.open(fresh_redis_url(redis_server), None)
    try:
        await put(first, "same-key")
        await put(second, "same-key")
        (claim,) = await first.claim("ex_a", 10, 30, [])
        assert await second.counts() == {S.PENDING: 1}
        assert await first.counts() == {S.RUNNING: 1}
        assert (await second.claim("ex_b", 10, 30, []))[0].intent.id != claim.intent.id
        for store in (first, second):
            keys = [k async for k in raw.scan_iter(match=f"*{store.namespace}*")]
            assert keys
            assert all(k.startswith(f"{{{store.namespace}}}:") for k in keys)
    finally:
        await first.close()
        await second.close()


# -- time and takeover --------------------------------------------------------------------


async def test_server_clock_without_a_clock(rs: RedisStore, raw: aioredis.Redis) -> None:
    await put(rs, "k")
    seconds, micros = await raw.time()
    (claim,) = await rs.claim("ex_a", 1, 30, [])
    assert claim.lease.expires_at.timestamp() == pytest.approx(seconds + micros / 1e6 + 30, abs=1)


async def test_expired_lease_taken_over_in_real_time(rs: RedisStore, raw: aioredis.Redis) -> None:
    (intent_id,) = await put(rs, "k")
    (first,) = await rs.claim("ex_a", 1, 0.3, [])
    (attempt,) = await rs.start_attempts([first.lease])
    assert attempt is not None
    assert await rs.claim("ex_b", 1, 0.3, []) == []
    await asyncio.sleep(0.35)
    (second,) = await rs.claim("ex_b", 1, 0.3, [])
    assert second.intent.id == intent_id
    assert second.previous_state is S.RUNNING
    assert second.lease.token == first.lease.token + 1
    assert second.open_attempt == attempt
    # the stream entry moved with the lease
    (pending,) = await raw.xpending_range(key(rs, f"q:{SCOPE}"), "farmhand", "-", "+", 10)
    assert pending["consumer"] == "ex_b"
    assert await rs.apply([succeed(first, 1)]) == [False]
    assert await rs.apply([succeed(second, 1)]) == [True]
    assert await raw.xpending(key(rs, f"q:{SCOPE}"), "farmhand") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_sweep_leases_an_entry_delivered_but_never_leased(
    rs: RedisStore, raw: aioredis.Redis
) -> None:
    # what a claim script that failed half-way would leave: delivered, still pending
    (intent_id,) = await put(rs, "k")
    stream = key(rs, f"q:{SCOPE}")
    assert await raw.xreadgroup("farmhand", "ghost", {stream: ">"}, count=1)
    assert await rs.claim("ex_a", 1, 0.2, []) == []
    await asyncio.sleep(0.25)
    (claim,) = await rs.claim("ex_a", 1, 0.2, [])
    assert (claim.intent.id, claim.previous_state) == (intent_id, S.PENDING)
    (pending,) = await raw.xpending_range(stream, "farmhand", "-", "+", 10)
    assert pending["consumer"] == "ex_a"


async def test_sweep_hands_a_live_lease_back_to_its_holder(
    rs: RedisStore, raw: aioredis.Redis
) -> None:
    await put(rs, "k")
    (held,) = await rs.claim("ex_a", 1, 30, [])
    await asyncio.sleep(0.15)
    # a claimer with a shorter lease finds the entry idle, but the record's lease decides
    assert await rs.claim("ex_b", 1, 0.1, []) == []
    (pending,) = await raw.xpending_range(key(rs, f"q:{SCOPE}"), "farmhand", "-", "+", 10)
    assert pending["consumer"] == "ex_a"
    assert await rs.apply([succeed(held, 0)]) == [True]


async def test_renewal_keeps_a_long_call_from_being_swept(rs: RedisStore) -> None:
    await put(rs, "k")
    (held,) = await rs.claim("ex_a", 1, 0.3, [])
    lease = held.lease
    for _ in range(4):
        await asyncio.sleep(0.15)
        (renewed,) = await rs.renew([lease], 0.3)
        assert renewed is not None
        lease = renewed
        assert await rs.claim("ex_b", 1, 0.3, []) == []
    (attempt,) = await rs.start_attempts([lease])
    assert attempt is not None


# -- stream housekeeping ------------------------------------------------------------------


async def test_finished_entries_are_trimmed(rs: RedisStore, raw: aioredis.Redis) -> None:
    for batch in range(5):
        await put(rs, *(f"k{batch}-{i}" for i in range(100)))
        claims = await rs.claim("ex_a", 100, 30, [])
        assert len(claims) == 100
        assert all(await rs.apply([succeed(c, 0) for c in claims]))
    # whole stream nodes (100 entries each) go once every entry in them is acknowledged
    assert await raw.xlen(key(rs, f"q:{SCOPE}")) < 200


async def test_cancelled_ready_intent_leaves_the_stream(rs: RedisStore) -> None:
    (intent_id,) = await put(rs, "k")
    cancel = Change(
        intent_id=intent_id,
        to_state=S.CANCELLED,
        actor="human:ops",
        action="cancel",
        from_states=(S.PENDING,),
    )
    assert await rs.apply([cancel]) == [True]
    assert (await rs.readiness()).next_ready_at is None
    assert await rs.claim("ex_a", 10, 30, []) == []


# -- wake-ups -----------------------------------------------------------------------------


async def test_another_connections_commit_wakes_a_waiter(rs: RedisStore, url: str) -> None:
    since = await rs.change_counter()
    other = await open_store(url)
    try:
        waiter = asyncio.ensure_future(rs.wait_for_change(since, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = time.monotonic()
        await put(other, "k")
        await asyncio.wait_for(waiter, 1.0)
        assert time.monotonic() - started < 0.5
    finally:
        await other.close()


async def test_a_cancelled_wait_leaves_the_store_usable(rs: RedisStore) -> None:
    since = await rs.change_counter()
    for _ in range(5):
        waiter = asyncio.ensure_future(rs.wait_for_change(since, 5.0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    await put(rs, "k")
    assert await rs.change_counter() != since
    started = time.monotonic()
    await rs.wait_for_change(since, 5.0)  # already changed: returns at once
    assert time.monotonic() - started < 0.5


async def test_idle_claims_and_reads_change_nothing(rs: RedisStore) -> None:
    before = await rs.change_counter()
    assert await rs.claim("ex_a", 10, 30, []) == []
    await rs.readiness()
    await rs.list_intents(IntentQuery())
    assert await rs.change_counter() == before


async def test_leases_and_outcomes_wake_no_one_releases_do(rs: RedisStore, url: str) -> None:
    other = await open_store(url)
    try:
        await put(other, "a", "b")
        since = await rs.change_counter()
        a, b = await other.claim("ex_b", 10, 30, [])
        (attempt,) = await other.start_attempts([a.lease])
        assert attempt is not None
        assert await other.renew([a.lease], 30) != [None]
        # the outcome ends the scope's last lease but makes nothing claimable
        assert await other.apply([succeed(a, 1)]) == [True]
        await rs.wait_for_change(since, 0.3)
        assert await rs.change_counter() == since
        back = Change(b.intent.id, S.PENDING, "ex_b", "release", token=b.lease.token)
        waiter = asyncio.ensure_future(rs.wait_for_change(since, 5.0))
        assert await other.apply([back]) == [True]
        await asyncio.wait_for(waiter, 1.0)
        assert await rs.change_counter() != since
    finally:
        await other.close()


# -- attempt starts that take tokens ------------------------------------------------------

BURST_TWO = Bucket("account:default", Limit(rate=1.0, burst=2))
TAKING = Guard("noop", "default", take=(BURST_TWO,))


@pytest.mark.parametrize("race", ["another take", "a slow decision"])
async def test_a_start_whose_tokens_were_decided_on_stale_buckets_decides_again(
    rs: RedisStore, url: str, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    await put(rs, "k")
    (claim,) = await rs.claim("ex_a", 1, 30, [])
    other = await open_store(url)
    scripts: list[str] = []
    read, run = rs._limits._read, rs._link.run

    async def racing_read(table: str, names: Sequence[str]) -> tuple[float, dict[str, str]]:
        found = await read(table, names)
        if race == "another take":
            await other.take([[BURST_TWO]])
        else:  # older than the 50 ms a decision may lag the server's clock
            await asyncio.sleep(0.06)
        return found

    async def counted_run(name: str, args: Sequence[Any], now: str | None = None) -> Any:
        scripts.append(name)
        return await run(name, args, now)

    monkeypatch.setattr(rs._limits, "_read", racing_read)
    monkeypatch.setattr(rs._link, "run", counted_run)
    try:
        (started,) = await rs.start_attempts([claim.lease], [TAKING])
    finally:
        monkeypatch.undo()
        await other.close()
    assert isinstance(started, Admitted)
    # the first decision was not written; the second was made on what start.lua read then
    assert scripts == ["rows", "start", "start"]
    left = 0 if race == "another take" else 1
    assert started.throttle.tokens == left
    assert (await rs.peek([BURST_TWO])).tokens == left
    status = await rs.get_intent("k")
    assert status is not None
    assert status.attempts == 1


async def test_tokens_taken_with_a_start_wake_no_one(rs: RedisStore) -> None:
    await put(rs, "k")
    (claim,) = await rs.claim("ex_a", 1, 30, [])
    since = await rs.change_counter()
    (started,) = await rs.start_attempts([claim.lease], [TAKING])
    assert isinstance(started, Admitted)
    assert await rs.change_counter() == since


# -- durability ---------------------------------------------------------------------------


async def test_receipts_survive_a_crash_with_appendfsync_always() -> None:
    server = LocalRedis(appendonly=True, appendfsync="always").start()
    try:
        url = f"{server.url}?namespace=durable"
        store = await open_store(url, FakeClock())
        (intent_id,) = await put(store, "k")
        (claim,) = await store.claim("ex_a", 1, 30, [])
        await store.start_attempts([claim.lease])
        assert await store.apply([succeed(claim, 1)]) == [True]
        counter = await store.change_counter()
        await store.close()

        # SIGKILL: no shutdown save, only what the AOF already holds
        process = server._proc
        assert process is not None
        process.kill()
        process.wait()
        server.start()

        store = await open_store(url, FakeClock())
        try:
            status = await store.get_intent(intent_id)
            assert status is not None
            assert status.state is S.SUCCEEDED
            assert [r.outcome for r in status.receipts] == [Outcome.SUCCEEDED]
            assert [e.action for e in reversed(await store.audit(intent_id))] == [
                "submit",
                "claim",
                "succeed",
            ]
            assert await store.change_counter() == counter
            assert await store.claim("ex_b", 10, 30, []) == []
        finally:
            await store.close()
    finally:
        server.stop()


async def test_an_open_store_reads_on_after_a_server_restart() -> None:
    server = LocalRedis(appendonly=True, appendfsync="always").start()
    try:
        store = await open_store(f"{server.url}?namespace=restart", FakeClock())
        try:
            (intent_id,) = await put(store, "k")
            process = server._proc
            assert process is not None
            process.kill()
            process.wait()
            server.start()
            # the pooled connection died with the server: reads are sent again on a new one
            status = await store.get_intent(intent_id)
            assert status is not None
            assert await store.counts() == {S.PENDING: 1}
            (claim,) = await store.claim("ex_a", 1, 30, [])
            assert claim.intent.id == intent_id
        finally:
            await store.close()
    finally:
        server.stop()
