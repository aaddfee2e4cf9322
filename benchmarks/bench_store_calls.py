"""Round trips per store call on PostgreSQL and Redis, counted through a slow loopback proxy.

Every call of the store goes through a TCP proxy on loopback that holds each chunk the server
sends back for ``--delay`` seconds (20 ms by default), so a call's time divided by that delay
is about the number of round trips it waited for; the server's own work is a fraction of a
millisecond. The baseline of the same run is one plain query (``SELECT 1``, ``GET``) through
the same proxy: 1.0 by construction.

What it shows: the start of an attempt of a rate-limited account, with its tokens taken in
the same atomic step (``Guard.take``), beside the way an executor used to do it -- ``take``,
then ``breaker_enter``, then the start -- and the other writes of rate limits and breakers.

    .venv/bin/python benchmarks/bench_store_calls.py            # both backends, ~1 min
    .venv/bin/python benchmarks/bench_store_calls.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from farmhand.canonical import payload_hash
from farmhand.config import BreakerConfig, Limit
from farmhand.contracts import Intent, IntentState, Lease
from farmhand.contracts.base import utc
from farmhand.ids import new_id
from farmhand.store import Store, open_store
from farmhand.store.base import BreakerResult, Bucket, Guard, NewIntent

#: a bucket that never runs dry during the run: every take writes, none waits
BUCKET = Bucket("account:bench", Limit(rate=1e6, burst=1_000_000))
KEY = "noop:bench"
PLAIN = Guard("noop", "bench", (BUCKET.name,), KEY)
TAKING = Guard("noop", "bench", breaker=KEY, take=(BUCKET,))
ENTERED = Guard("noop", "bench")
BREAKER = BreakerConfig(failures=1_000_000, cooldown=60.0)


class SlowProxy:
    """A loopback TCP proxy that delivers what the server sends ``delay`` seconds late
    (in order); what the client sends goes through at once."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self._upstream = upstream
        self._delay = delay
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> SlowProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        tasks = {
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._hold(up_reader, late)),
            asyncio.create_task(self._deliver(late, writer)),
        }
        self._connections |= tasks
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._connections -= tasks
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _hold(self, reader: asyncio.StreamReader, late: asyncio.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(65536):
            late.put_nowait((loop.time() + self._delay, data))

    @staticmethod
    async def _deliver(late: asyncio.Queue[Any], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await late.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    scheme, rest = url.split("://", 1)
    userinfo, _, hostpath = rest.rpartition("@")
    path = hostpath.split("/", 1)[1] if "/" in hostpath else ""
    head = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{head}127.0.0.1:{port}/{path}"


def intent(n: int) -> Intent:
    payload = {"n": n}
    return Intent(
        id=new_id("in"),
        key=f"bench-{n}-{new_id('k')}",
        kind="noop",
        account="bench",
        payload=payload,
        payload_hash=payload_hash(payload),
        created_at=utc(time.time()),
    )


async def leases(store: Store, count: int) -> list[Lease]:
    """``count`` fresh leases (set up outside the timed part)."""
    items = [NewIntent(intent(i), IntentState.PENDING, "agent:bench") for i in range(count)]
    await store.put_intents(items)
    claims = await store.claim("ex_bench", count, 60.0, [])
    assert len(claims) == count, "the bench's store must start empty"
    return [c.lease for c in claims]


async def timed(call: Callable[[], Awaitable[object]], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def measure_store(url: str, rounds: int, delay: float) -> dict[str, float]:
    """Median seconds per call, divided by ``delay``: round trips."""
    store = await open_store(url)
    try:
        out: dict[str, float] = {}

        async def per_lease(name: str, call: Callable[[Lease], Awaitable[object]]) -> None:
            pool = iter(await leases(store, rounds))
            out[name] = await timed(lambda: call(next(pool)), rounds) / delay

        def start(guard: Guard) -> Callable[[Lease], Awaitable[object]]:
            return lambda lease: store.start_attempts([lease], [guard])

        await per_lease("start, no rate limit", start(PLAIN))
        await per_lease("start, tokens taken with it", start(TAKING))

        async def before(lease: Lease) -> None:
            await store.take([(BUCKET,)])
            await store.breaker_enter([(KEY, lease.intent_id)], "ex_bench", 60.0)
            await store.start_attempts([lease], [ENTERED])

        await per_lease("take, breaker_enter, start (as before)", before)
        out["take"] = await timed(lambda: store.take([(BUCKET,)]), rounds) / delay
        failure = [BreakerResult(KEY, "t", False, "HTTP 503")]
        out["breaker_record, a failure"] = (
            await timed(lambda: store.breaker_record(failure, BREAKER, "ex_bench"), rounds) / delay
        )
        return out
    finally:
        await store.close()


async def baseline(backend: str, url: str, rounds: int, delay: float) -> float:
    """Round trips of one plain query through the proxy (1.0 by construction)."""
    if backend == "postgres":
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await timed(lambda: conn.execute("SELECT 1"), rounds) / delay
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)

    async def ping() -> None:
        await client.get("bench")

    try:
        return await timed(ping, rounds) / delay
    finally:
        await client.aclose()


async def measure(backend: str, base: str, rounds: int, delay: float) -> dict[str, float]:
    host, port = base.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0].split(":")
    async with SlowProxy((host, int(port)), delay) as proxy:
        url = through(base, proxy.port)
        out = {"one plain query (baseline)": await baseline(backend, url, rounds, delay)}
        if backend == "redis":
            url += f"?namespace=bench_{new_id('ns')}"
        out |= await measure_store(url, rounds, delay)
        return out


def render(results: dict[str, dict[str, float]], delay: float, rounds: int) -> str:
    names = list(next(iter(results.values())))
    width = max(len(n) for n in names)
    lines = [
        f"store round trips per call: median of {rounds} calls through a loopback proxy that "
        f"delays each reply {delay * 1000:.0f} ms",
        f"{'':{width}}  " + "  ".join(f"{b:>9}" for b in results),
    ]
    for name in names:
        lines.append(f"{name:{width}}  " + "  ".join(f"{r[name]:9.2f}" for r in results.values()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="calls per figure")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds added per reply")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from farmhand.testing.servers import LocalPostgres, LocalRedis

    results: dict[str, dict[str, float]] = {}
    with LocalPostgres() as pg:
        results["postgres"] = asyncio.run(measure("postgres", pg.url, args.rounds, args.delay))
    with LocalRedis() as rd:
        results["redis"] = asyncio.run(measure("redis", rd.url, args.rounds, args.delay))
    print(json.dumps(results, indent=1) if args.json else render(results, args.delay, args.rounds))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
