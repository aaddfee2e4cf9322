#!/usr/bin/env python3
"""farmhand on PostgreSQL and Redis: each figure beside a raw baseline on the same server, same run.

Per backend:

1. throughput: N pre-loaded ``noop`` intents drained by 2 ``farmhand executor run --drain
   --concurrency B`` processes (B = the claim batch), against a raw queue on the same
   server with 2 worker processes claiming batches of B: plain SQL ``FOR UPDATE SKIP
   LOCKED`` claim + ``UPDATE … done`` on PostgreSQL, plain ``XADD``/``XREADGROUP``/``XACK``
   on Redis;
2. the store's floor: the same intents drained by 2 processes that only drive the store
   contract (claim, start the attempts, write the receipts; no signature, policy, limits or
   calls), i.e. what the durable writes alone cost, below which no executor can go;
3. the best existing queue on that server, drained the same way in the same run
   (``bench_reference.py``: PgQueuer on PostgreSQL, huey on Redis), when installed;
4. latency: submit -> receipt at a fixed offered rate (one submit per intent, absolute
   schedule) with 2 long-running executors, against the raw queue fed the same way and
   woken the way its server allows (LISTEN/NOTIFY; a blocking XREADGROUP).

The servers are throw-away ones started here on loopback (PostgreSQL with fsync on, Redis
with AOF ``appendfsync everysec``, as the docs recommend), or the ones named by
``--postgres``/``--redis``. Progress goes to stderr, the table (or ``--json``) to stdout::

    .venv/bin/python benchmarks/bench_servers.py                  # both backends, ~4 min
    .venv/bin/python benchmarks/bench_servers.py --backend redis --intents 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from bench_sqlite import (
    LatencyResult,
    Pacing,
    children_cpu,
    drain,
    fresh_dir,
    init_home,
    latency_result,
    offered_submits,
    preload,
    progress,
    start_executors,
    wait_until_listening,
    warm_bytecode,
)

#: the best existing queue on each server, and its drain as once quoted for this kind of
#: machine (2 workers, 20,000 jobs); bench_reference.py measures it in the same run instead
#: when PgQueuer / huey are installed (make bench installs them)
REFERENCE = {"postgres": ("PgQueuer", 5_000.0), "redis": ("huey", 4_700.0)}
TARGET_SHARE = 0.60  # farmhand end to end / raw baseline, same batch size
TARGET_P95_MS = {"postgres": 10.0, "redis": 3.0}  # at 200/s offered


@dataclass
class Options:
    backends: list[str]
    intents: int
    executors: int
    #: claim batch of both sides; farmhand's executors run with --concurrency batch
    concurrency: int
    rate: float
    duration: float
    tmpdir: str | None
    keep: bool
    as_json: bool
    postgres: str | None
    redis: str | None
    #: also drain the reference queue (PgQueuer, huey) on the same server
    reference: bool = True
    pycache: str | None = None


# -- farmhand side ------------------------------------------------------------------------


async def read_outcome(url: str, n: int) -> dict[str, Any]:
    """Exactly-once check and receipt times, read back through the store API."""
    from farmhand.contracts import IntentState, Outcome
    from farmhand.store import IntentQuery, open_store

    store = await open_store(url)
    try:
        counts = await store.counts()
        intents = await store.list_intents(IntentQuery(limit=n + 1))
    finally:
        await store.close()
    succeeded = [[r for r in i.receipts if r.outcome is Outcome.SUCCEEDED] for i in intents]
    finished = sorted(r[0].finished_at.timestamp() for r in succeeded if r)
    lat = [
        (
            r[0].finished_at.timestamp() - i.created_at.timestamp(),
            (r[0].started_at or r[0].finished_at).timestamp() - i.created_at.timestamp(),
        )
        for i, r in zip(intents, succeeded, strict=True)
        if r
    ]
    return {
        "intents": len(intents),
        "succeeded": counts.get(IntentState.SUCCEEDED, 0),
        "one_success_each": sum(1 for r in succeeded if len(r) == 1),
        "receipts": sum(len(i.receipts) for i in intents),
        "finished": finished,
        "latencies": lat,
    }


@dataclass
class Drain:
    n: int
    wall_s: float
    wall_rate: float
    steady_rate: float
    cpu_us_per_intent: float
    exactly_once: bool


def drained(url: str, opts: Options, name: str, how: str, run: Callable[[Path], Any]) -> Drain:
    """Pre-load ``opts.intents`` intents, ``run(workdir)`` the processes that drain them
    (returns their wall and CPU seconds) and check that each succeeded exactly once."""
    n = opts.intents
    with fresh_dir(f"{name}-{how.rsplit(maxsplit=1)[-1]}", opts) as workdir:
        progress(f"{name}: pre-loading {n:,} intents")
        asyncio.run(preload(url, workdir / "home", n, 1000))
        progress(f"{name}: draining with {opts.executors} {how}, batch {opts.concurrency}")
        wall, cpu_s = run(workdir)
        found = asyncio.run(read_outcome(url, n))
    finished = found["finished"]
    steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else 0.0
    return Drain(
        n=n,
        wall_s=wall,
        wall_rate=n / wall,
        steady_rate=steady,
        cpu_us_per_intent=cpu_s / n * 1e6,
        exactly_once=found["intents"] == found["succeeded"] == found["one_success_each"] == n,
    )


def farmhand_drain(url: str, opts: Options, name: str) -> Drain:
    return drained(url, opts, name, "executors", lambda workdir: drain(workdir, url, opts)[:2])


async def wait_succeeded(url: str, want: int, timeout: float) -> int:
    from farmhand.contracts import IntentState
    from farmhand.store import open_store

    store = await open_store(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            have = (await store.counts()).get(IntentState.SUCCEEDED, 0)
            if have >= want or time.monotonic() > deadline:
                return have
            await asyncio.sleep(0.05)
    finally:
        await store.close()


@dataclass
class Load:
    """What the offered-rate phase cost: the workers' CPU per intent (executors or raw
    workers, start-up left out) and how busy the host's cores were, whoever used them."""

    cpu_us_per_intent: float
    host_busy_share: float


class LoadMeter:
    """CPU of processes ``pids`` and of the whole host between :meth:`start` and
    :meth:`stop`, read from /proc (Linux)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._begin = (0.0, (0, 0))

    @staticmethod
    def _process_cpu(pid: int) -> float:
        # utime and stime, the 14th and 15th fields; the name before them may hold spaces
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _host() -> tuple[int, int]:
        """(busy, total) jiffies of all cores: total less idle and iowait is busy."""
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        total = sum(ticks[:8])  # guest time is already counted in user time
        return total - ticks[3] - ticks[4], total

    def _now(self) -> tuple[float, tuple[int, int]]:
        return sum(self._process_cpu(pid) for pid in self.pids), self._host()

    def start(self) -> None:
        self._begin = self._now()

    def stop(self, intents: int) -> Load:
        (cpu0, (busy0, total0)), (cpu1, (busy1, total1)) = self._begin, self._now()
        return Load(
            cpu_us_per_intent=(cpu1 - cpu0) / intents * 1e6,
            host_busy_share=(busy1 - busy0) / max(1, total1 - total0),
        )


def farmhand_latency(url: str, opts: Options, name: str) -> tuple[LatencyResult, Load]:
    total = max(1, round(opts.rate * opts.duration))
    with fresh_dir(f"{name}-latency", opts) as workdir:
        home = init_home(workdir / "home")
        group = start_executors(workdir, url, opts, drain=False)
        try:
            wait_until_listening(group)
            time.sleep(0.3)
            progress(f"{name}: submitting {total:,} intents at {opts.rate:g}/s")
            meter = LoadMeter([proc.pid for proc in group.procs])
            meter.start()
            pacing = asyncio.run(offered_submits(url, home, opts.rate, total))
            done = asyncio.run(wait_succeeded(url, total, 60.0))
            if done < total:
                raise group.failure(f"only {done} of {total} intents succeeded")
            load = meter.stop(total)
            for proc in group.procs:
                proc.send_signal(signal.SIGTERM)
            for proc in group.procs:
                proc.wait(timeout=30)
        finally:
            group.kill_leftovers()
        found = asyncio.run(read_outcome(url, total))
    return latency_result(opts.rate, total, pacing, found["latencies"]), load


# -- the store's floor --------------------------------------------------------------------


def floor_worker(url: str, name: str, batch: int, done: Any) -> None:
    """Drive the store contract with nothing else: claim a batch, start its attempts, write a
    success receipt for each, until nothing is left. No signature, policy, limits or calls:
    what the store's own durable writes cost, which no executor can go below."""

    async def run() -> int:
        from farmhand.config import RetryConfig
        from farmhand.connectors import Succeeded
        from farmhand.contracts import Attempt
        from farmhand.executor import outcomes
        from farmhand.store import open_store

        store = await open_store(url)
        rng, retry, finished = random.Random(), RetryConfig(), 0
        try:
            while claims := await store.claim(name, batch, 30.0, []):
                started = await store.start_attempts([c.lease for c in claims])
                now = time.time()
                changes = [
                    outcomes.after_call(claim, a, Succeeded(claim.intent.id), now, retry, rng)
                    for claim, a in zip(claims, started, strict=True)
                    if isinstance(a, Attempt)
                ]
                finished += sum(await store.apply(changes))
        finally:
            await store.close()
        return finished

    done.put(asyncio.run(run()))


def floor_loops(url: str, opts: Options) -> tuple[float, float]:
    """Run ``opts.executors`` :func:`floor_worker` processes to the end: wall, CPU seconds."""
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    t, cpu = time.perf_counter(), children_cpu()
    procs = [
        ctx.Process(target=floor_worker, args=(url, f"floor{i}", opts.concurrency, done))
        for i in range(opts.executors)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        done.get(timeout=900)
    for proc in procs:
        proc.join(30)
    return time.perf_counter() - t, children_cpu() - cpu


def floor_drain(url: str, opts: Options, name: str) -> Drain:
    return drained(url, opts, name, "bare store loops", lambda _: floor_loops(url, opts))


# -- raw baselines ------------------------------------------------------------------------


def job_payload(i: int) -> str:
    # about the size of a farmhand intent body, so both sides move the same bytes
    return json.dumps(
        {"kind": "noop", "key": f"bench-{i}", "account": "default", "agent": "local"}
        | {"payload": {}, "max_attempts": 5, "created_at": time.time()}
    )


PG_SCHEMA = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    payload text NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    owner text,
    created_at double precision NOT NULL,
    claimed_at double precision,
    done_at double precision
);
CREATE INDEX jobs_pending ON jobs (id) WHERE state = 'pending';
"""
PG_CLAIM = """
UPDATE jobs SET state = 'running', owner = %s, claimed_at = extract(epoch from clock_timestamp())
WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT %s
             FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
PG_DONE = (
    "UPDATE jobs SET state = 'done', done_at = extract(epoch from clock_timestamp())"
    " WHERE id = ANY(%s)"
)


def pg_worker(
    url: str, name: str, batch: int, drain: bool, ready: EventType, stop: EventType
) -> None:
    import psycopg

    with (
        psycopg.connect(url, autocommit=True) as conn,
        psycopg.connect(url, autocommit=True) as listen,
    ):
        listen.execute("LISTEN jobs")
        ready.set()
        while not stop.is_set():
            rows = conn.execute(PG_CLAIM, (name, batch)).fetchall()
            if rows:
                for _, payload in rows:
                    json.loads(payload)
                conn.execute(PG_DONE, ([r[0] for r in rows],))
                continue
            if drain:
                break
            for _ in listen.notifies(timeout=0.5, stop_after=1):
                pass


def redis_worker(
    url: str, name: str, batch: int, drain: bool, ready: EventType, stop: EventType
) -> None:
    import redis

    client = redis.Redis.from_url(url)
    ready.set()
    while not stop.is_set():
        got = client.xreadgroup(
            "workers", name, {"jobs": ">"}, count=batch, block=None if drain else 500
        )
        entries = got[0][1] if got else []
        if not entries:
            if drain:
                break
            continue
        pipe = client.pipeline(transaction=False)
        ids = []
        for entry_id, fields in entries:
            json.loads(fields[b"p"])
            ids.append(entry_id)
            pipe.hset("done", entry_id, time.time())
        pipe.xack("jobs", "workers", *ids)
        pipe.execute()


@dataclass
class Workers:
    procs: list[multiprocessing.process.BaseProcess]
    ready: list[EventType]
    stop: EventType

    def wait_ready(self) -> None:
        for event in self.ready:
            if not event.wait(30):
                raise RuntimeError("a baseline worker did not start")

    def join(self, timeout: float) -> None:
        for proc in self.procs:
            proc.join(timeout)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        if any(p.exitcode != 0 for p in self.procs):
            raise RuntimeError(f"baseline worker failed: {[p.exitcode for p in self.procs]}")


def start_workers(target: Callable[..., None], url: str, opts: Options, drain: bool) -> Workers:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    ready = [ctx.Event() for _ in range(opts.executors)]
    procs: list[multiprocessing.process.BaseProcess] = [
        ctx.Process(target=target, args=(url, f"w{i}", opts.concurrency, drain, ready[i], stop))
        for i in range(opts.executors)
    ]
    for proc in procs:
        proc.start()
    return Workers(procs, ready, stop)


class RawQueue:
    """The raw baseline on one server: create, preload, submit one, count done."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend, self.url = backend, url

    def create(self) -> None:
        if self.backend == "postgres":
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(PG_SCHEMA)
        else:
            import redis

            client = redis.Redis.from_url(self.url)
            client.flushdb()
            client.xgroup_create("jobs", "workers", id="0", mkstream=True)

    def preload(self, n: int) -> None:
        now = time.time()
        if self.backend == "postgres":
            import psycopg

            with (
                psycopg.connect(self.url) as conn,
                conn.cursor() as cur,
                cur.copy("COPY jobs (payload, created_at) FROM STDIN") as copy,
            ):
                for i in range(n):
                    copy.write_row((job_payload(i), now))
        else:
            import redis

            client = redis.Redis.from_url(self.url)
            for start in range(0, n, 1000):
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(n, start + 1000)):
                    pipe.xadd("jobs", {"p": job_payload(i), "t": now})
                pipe.execute()

    def worker(self) -> Callable[..., None]:
        return pg_worker if self.backend == "postgres" else redis_worker

    def latencies(self) -> list[tuple[float, float]]:
        if self.backend == "postgres":
            import psycopg

            with psycopg.connect(self.url) as conn:
                rows = conn.execute(
                    "SELECT done_at - created_at, claimed_at - created_at FROM jobs"
                    " WHERE done_at IS NOT NULL"
                ).fetchall()
            return [(float(a), float(b)) for a, b in rows]
        import redis

        client = redis.Redis.from_url(self.url)
        done = {k: float(v) for k, v in client.hgetall("done").items()}
        rows = []
        for entry_id, fields in client.xrange("jobs"):
            if entry_id in done:
                latency = done[entry_id] - float(fields[b"t"])
                rows.append((latency, latency))
        return rows

    def done(self) -> int:
        if self.backend == "postgres":
            import psycopg

            with psycopg.connect(self.url) as conn:
                row = conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()
            return int(row[0]) if row else 0
        import redis

        return int(redis.Redis.from_url(self.url).hlen("done"))

    def submitter(self) -> Callable[[int], None]:
        if self.backend == "postgres":
            import psycopg

            conn = psycopg.connect(self.url, autocommit=True)

            def submit_pg(i: int) -> None:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO jobs (payload, created_at) VALUES (%s, %s)",
                        (job_payload(i), time.time()),
                    )
                    conn.execute("NOTIFY jobs")

            return submit_pg
        import redis

        client = redis.Redis.from_url(self.url)

        def submit_redis(i: int) -> None:
            client.xadd("jobs", {"p": job_payload(i), "t": time.time()})

        return submit_redis


def raw_drain(queue: RawQueue, opts: Options) -> Drain:
    n = opts.intents
    queue.create()
    queue.preload(n)
    progress(f"{queue.backend} raw: draining {n:,} jobs, batch {opts.concurrency}")
    t, cpu = time.perf_counter(), children_cpu()
    workers = start_workers(queue.worker(), queue.url, opts, drain=True)
    workers.join(900)
    wall = time.perf_counter() - t
    cpu_s = children_cpu() - cpu
    done = queue.done()
    return Drain(n, wall, n / wall, math.nan, cpu_s / n * 1e6, done == n)


def raw_latency(queue: RawQueue, opts: Options) -> tuple[LatencyResult, Load]:
    total = max(1, round(opts.rate * opts.duration))
    queue.create()
    workers = start_workers(queue.worker(), queue.url, opts, drain=False)
    try:
        workers.wait_ready()
        time.sleep(0.3)
        submit = queue.submitter()
        meter = LoadMeter([proc.pid for proc in workers.procs if proc.pid is not None])
        meter.start()
        pacing = Pacing()
        start = time.perf_counter() + 0.05
        for i in range(total):
            due = start + i / opts.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            began = time.perf_counter()
            pacing.max_lag_ms = max(pacing.max_lag_ms, (began - due) * 1000)
            submit(i)
            pacing.call_ms.append((time.perf_counter() - began) * 1000)
        pacing.achieved_rate = total / (time.perf_counter() - start)
        deadline = time.monotonic() + 60
        while queue.done() < total and time.monotonic() < deadline:
            time.sleep(0.05)
        load = meter.stop(total)
    finally:
        workers.stop.set()
        workers.join(30)
    return latency_result(opts.rate, total, pacing, queue.latencies()), load


# -- servers, databases, output -----------------------------------------------------------


class Server:
    """One throw-away server (or a given URL) handing out fresh databases / namespaces."""

    def __init__(self, backend: str, given: str | None) -> None:
        self.backend = backend
        self._given = given
        self._local: Any = None
        self._n = 0

    def __enter__(self) -> Server:
        from farmhand.testing.servers import LocalPostgres, LocalRedis

        if self._given is None:
            local = LocalPostgres(durable=True) if self.backend == "postgres" else LocalRedis()
            self._local = local.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._local is not None:
            self._local.stop()

    @property
    def base(self) -> str:
        return self._given or self._local.url

    def fresh(self, purpose: str) -> tuple[str, str]:
        """(farmhand store URL, raw baseline URL) of a new empty database or namespace."""
        self._n += 1
        name = f"bench_{purpose}_{os.getpid()}_{self._n}"
        if self.backend == "postgres":
            import psycopg

            with psycopg.connect(self.base, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            url = f"{self.base.rsplit('/', 1)[0]}/{name}"
            return url, url
        db = self._n % 15 + 1  # the raw baseline flushes its own database, never farmhand's
        base = self.base.rsplit("/", 1)[0]
        return f"{self.base}?namespace={name}", f"{base}/{db}"


def measure(backend: str, opts: Options) -> dict[str, Any]:
    given = opts.postgres if backend == "postgres" else opts.redis
    out: dict[str, Any] = {}
    with Server(backend, given) as server:
        progress(f"{backend}: server at {server.base}")
        url, raw = server.fresh("drain")
        out["raw_drain"] = asdict(raw_drain(RawQueue(backend, raw), opts))
        out["drain"] = asdict(farmhand_drain(url, opts, backend))
        url, _ = server.fresh("floor")
        out["floor_drain"] = asdict(floor_drain(url, opts, backend))
        out["reference"] = reference(backend, server.base, opts)
        url, raw = server.fresh("latency")
        raw_result, raw_load = raw_latency(RawQueue(backend, raw), opts)
        result, load = farmhand_latency(url, opts, backend)
        out["raw_latency"], out["raw_latency_load"] = asdict(raw_result), asdict(raw_load)
        out["latency"], out["latency_load"] = asdict(result), asdict(load)
    return out


def reference(backend: str, url: str, opts: Options) -> dict[str, Any]:
    """The reference queue's drain on the same server in this run (PgQueuer on PostgreSQL,
    huey on Redis), or why it was not measured."""
    name = REFERENCE[backend][0]
    if not opts.reference:
        return {"name": name, "skipped": "--no-reference"}
    try:
        from bench_reference import reference_drain

        progress(f"{backend}: {name} draining {opts.intents:,} jobs")
        rate = reference_drain(backend, url, opts.intents, opts.executors, opts.concurrency)
    except (RuntimeError, ImportError) as exc:
        progress(f"{backend}: {name} not measured: {exc}")
        return {"name": name, "skipped": str(exc).splitlines()[0]}
    return {"name": name, "rate": rate}


def render(results: dict[str, Any], opts: Options) -> str:
    lines = [
        f"farmhand on server stores: {opts.intents:,} noop intents, {opts.executors} "
        f"executors, claim batch {opts.concurrency}; latency at {opts.rate:g}/s offered "
        f"for {opts.duration:g}s (load average {os.getloadavg()[0]:.2f})",
        "",
        "| backend | measurement | farmhand | raw baseline | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        if "error" in r:
            lines.append(f"| {backend} | failed: {r['error']} | | | | |")
            continue
        fh, raw = r["drain"], r["raw_drain"]
        share = fh["wall_rate"] / raw["wall_rate"]
        ref_name, quoted = REFERENCE[backend]
        measured = r.get("reference", {}).get("rate")
        ref_rate = measured if measured is not None else quoted
        lines.append(
            f"| {backend} | drain, intents/s end to end | **{fh['wall_rate']:,.0f}** | "
            f"{raw['wall_rate']:,.0f} | {share:.0%} | ≥ {TARGET_SHARE:.0%}: "
            f"{'ok' if share >= TARGET_SHARE and fh['exactly_once'] else 'MISS'} |"
        )
        floor = r["floor_drain"]
        lines.append(
            f"| {backend} | store statements alone (claim, start, receipt; no executor) | "
            f"{floor['wall_rate']:,.0f} | {raw['wall_rate']:,.0f} | "
            f"{floor['wall_rate'] / raw['wall_rate']:.0%} | floor of the end-to-end figure |"
        )
        where = "measured in this run" if measured is not None else "quoted, not measured here"
        beats = fh["wall_rate"] > ref_rate and fh["exactly_once"]
        lines.append(
            f"| {backend} | {ref_name} drain, jobs/s ({where}) | | {ref_rate:,.0f} | "
            f"{fh['wall_rate'] / ref_rate:.2f}x | farmhand ahead: {'ok' if beats else 'MISS'} |"
        )
        lines.append(
            f"| {backend} | CPU per intent (all worker processes) | "
            f"{fh['cpu_us_per_intent']:.0f} µs | {raw['cpu_us_per_intent']:.0f} µs | | |"
        )
        fl, rl = r["latency"], r["raw_latency"]
        target = TARGET_P95_MS[backend]
        lines.append(
            f"| {backend} | submit → receipt p50 / p95 / p99 | "
            f"{fl['p50_ms']:.1f} / **{fl['p95_ms']:.1f}** / {fl['p99_ms']:.1f} ms | "
            f"{rl['p50_ms']:.1f} / {rl['p95_ms']:.1f} / {rl['p99_ms']:.1f} ms | "
            f"{fl['p95_ms'] / rl['p95_ms']:.1f}x | p95 < {target:g} ms: "
            f"{'ok' if fl['p95_ms'] < target else 'MISS'} |"
        )
        fload, rload = r["latency_load"], r["raw_latency_load"]
        lines.append(
            f"| {backend} | at {opts.rate:g}/s: workers' CPU per intent · host cores busy | "
            f"{fload['cpu_us_per_intent']:,.0f} µs · {fload['host_busy_share']:.0%} | "
            f"{rload['cpu_us_per_intent']:,.0f} µs · {rload['host_busy_share']:.0%} | | |"
        )
        lines.append(
            f"| {backend} | exactly once (drain) | "
            f"{'yes' if fh['exactly_once'] else 'NO'} | {'yes' if raw['exactly_once'] else 'NO'}"
            " | | |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=("postgres", "redis"))
    parser.add_argument("--intents", type=int, default=20_000)
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="claim batch of both sides")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--postgres", help="use this server (a database URL) instead")
    parser.add_argument("--redis", help="use this server instead")
    parser.add_argument("--tmpdir")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true", dest="as_json")
    parser.add_argument(
        "--no-reference",
        action="store_false",
        dest="reference",
        help="skip the PgQueuer / huey drains (bench_reference.py) measured beside farmhand",
    )
    a = parser.parse_args(argv)
    return Options(
        backends=a.backend or ["postgres", "redis"],
        intents=a.intents,
        executors=a.executors,
        concurrency=a.batch,
        rate=a.rate,
        duration=a.duration,
        tmpdir=a.tmpdir,
        keep=a.keep,
        as_json=a.as_json,
        postgres=a.postgres,
        redis=a.redis,
        reference=a.reference,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    warm_bytecode(opts)
    results: dict[str, Any] = {}
    failed = False
    for backend in opts.backends:
        try:
            results[backend] = measure(backend, opts)
        except Exception as exc:
            progress(f"{backend}: failed: {exc}")
            results[backend] = {"error": str(exc).splitlines()[0]}
            failed = True
    if opts.as_json:
        print(json.dumps(results, indent=1, default=str))
    else:
        print(render(results, opts))
    failed = failed or not all(r.get("drain", {}).get("exactly_once") for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
