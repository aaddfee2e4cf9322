#!/usr/bin/env python3
"""What one store round trip costs the client in CPU, back to back and after a pause.

An executor at a low offered rate handles one intent at a time and sleeps in between, so
each of its round trips also pays for the process waking up. This measures that on the
host: the same trivial command (``SELECT 1`` through psycopg, alone and through a
psycopg_pool pool as the PostgreSQL store uses it; ``GET`` through redis-py's asyncio
client, as the Redis store uses it), ``--count`` times back to back, then ``--count``
times with a ``--pause`` sleep after each, on throw-away servers on loopback::

    .venv/bin/python benchmarks/bench_roundtrips.py
    .venv/bin/python benchmarks/bench_roundtrips.py --pause 0.005 --count 500 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


async def cpu_per_call(call: Callable[[], Awaitable[Any]], count: int, pause: float) -> float:
    """Process CPU microseconds per ``call()`` (and, with ``pause``, the sleep after it)."""
    await call()  # connect, prepare, warm up
    started = time.process_time()
    for _ in range(count):
        await call()
        if pause:
            await asyncio.sleep(pause)
    return (time.process_time() - started) / count * 1e6


async def measure(postgres: str, redis_url: str, count: int, pause: float) -> dict[str, Any]:
    import psycopg
    import redis.asyncio as redis
    from psycopg_pool import AsyncConnectionPool

    conn = await psycopg.AsyncConnection.connect(postgres, autocommit=True)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        postgres, kwargs={"autocommit": True}, min_size=2, open=False
    )
    await pool.open()
    client = redis.Redis.from_url(redis_url)
    await client.set("x", "1")

    async def select_one() -> None:
        await (await conn.execute("SELECT 1")).fetchall()

    async def pooled_select_one() -> None:
        async with pool.connection() as pooled:
            await (await pooled.execute("SELECT 1")).fetchall()

    async def get() -> None:
        await client.get("x")

    async def nothing() -> None:
        pass

    out: dict[str, Any] = {}
    try:
        for name, call in (
            ("psycopg SELECT 1", select_one),
            ("psycopg_pool SELECT 1", pooled_select_one),
            ("redis-py GET", get),
            ("no round trip (the sleep alone)", nothing),
        ):
            out[name] = {
                "back_to_back_us": await cpu_per_call(call, count, 0.0),
                "after_pause_us": await cpu_per_call(call, count, pause),
            }
    finally:
        await client.aclose()
        await pool.close()
        await conn.close()
    return out


def render(results: dict[str, Any], pause: float, count: int) -> str:
    lines = [
        f"CPU per round trip in this process, {count} each (load average {os.getloadavg()[0]:.2f})",
        "",
        f"| client | back to back | with a {pause * 1000:g} ms sleep after each | ratio |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = r["after_pause_us"] / r["back_to_back_us"] if r["back_to_back_us"] >= 1 else None
        lines.append(
            f"| {name} | {r['back_to_back_us']:.0f} µs | {r['after_pause_us']:.0f} µs | "
            f"{f'{ratio:.1f}x' if ratio else '—'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--pause", type=float, default=0.005, help="seconds (200/s: 0.005)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from farmhand.testing.servers import LocalPostgres, LocalRedis

    with LocalPostgres() as pg, LocalRedis() as rd:
        results = asyncio.run(measure(pg.url, rd.url, args.count, args.pause))
    print(json.dumps(results, indent=1) if args.json else render(results, args.pause, args.count))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
