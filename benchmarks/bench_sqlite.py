#!/usr/bin/env python3
"""farmhand on its embedded SQLite store: each figure beside a baseline measured in the same run.

1. throughput: N pre-loaded ``noop`` intents drained by 2 ``farmhand executor run --drain``
   processes, against a plain-SQLite job queue (2 worker processes, batched claim + done,
   WAL + synchronous=FULL, no farmhand);
2. latency: submit -> receipt at a fixed offered rate (one submit transaction per intent,
   paced by an absolute schedule) with 2 long-running executors, against the same queue
   fed the same way and woken the same way (PRAGMA data_version polled, 1..10 ms backoff);
3. CLI start-up: median wall time of ``farmhand --version`` and ``farmhand submit``, beside
   ``python -c pass``.

Every measurement gets a fresh temporary directory. Progress goes to stderr; the result
table (or, with ``--json``, one JSON object) to stdout. Run from the project root::

    .venv/bin/python benchmarks/bench_sqlite.py            # about 1 min on 2 cores
    .venv/bin/python benchmarks/bench_sqlite.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farmhand.coordinator import Coordinator
    from farmhand.store import Store

#: reference figures quoted in the output (not measured here)
HUEY_SQLITE_JOBS_PER_S = 1_900
TARGET_THROUGHPUT = 2_500.0  # intents/s end to end, 2 executors
TARGET_P95_MS = 15.0  # submit -> receipt at 200/s offered
TARGET_SUBMIT_MS = 200.0  # `farmhand submit`, wall time of the whole process

#: the wake-up strategy the SQLite store uses (farmhand.store.sqlite._MIN_POLL/_MAX_POLL)
POLL_MIN, POLL_MAX, POLL_GROWTH = 0.001, 0.010, 1.5

_T0 = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    sys.stderr.write(f"[{time.perf_counter() - _T0:6.1f}s] {message}\n")
    sys.stderr.flush()


# -- plumbing ---------------------------------------------------------------------------


@dataclass
class Options:
    intents: int
    chunk: int
    executors: int
    concurrency: int
    batch: int
    rate: float
    duration: float
    cli_runs: int
    sections: list[str]
    tmpdir: str | None
    keep: bool
    as_json: bool
    #: bytecode cache shared by every farmhand subprocess of this run (see warm_bytecode)
    pycache: str | None = None


@contextmanager
def fresh_dir(name: str, opts: Options) -> Iterator[Path]:
    """A new temporary directory for one measurement, removed afterwards unless --keep."""
    path = Path(tempfile.mkdtemp(prefix=f"farmhand-bench-{name}-", dir=opts.tmpdir))
    try:
        yield path
    finally:
        if opts.keep:
            progress(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def farmhand_bin() -> Path:
    """The ``farmhand`` script installed next to the running interpreter."""
    found = shutil.which("farmhand", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(
            "farmhand is not installed next to this Python; run the benchmark with the "
            "project's venv: .venv/bin/python benchmarks/bench_sqlite.py"
        )
    return Path(found)


def child_env(workdir: Path, opts: Options, bytecode: bool = True) -> dict[str, str]:
    """Environment for farmhand subprocesses: no settings leak in from the caller's cwd.

    With ``bytecode``, modules are loaded from a bytecode cache kept in this run's temp
    directory, as from an installed package, even where PYTHONDONTWRITEBYTECODE is set
    (an editable install then recompiles farmhand's sources in every process).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(init_home(workdir / "home"))
    if bytecode and opts.pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = opts.pycache
    return env


def init_home(home: Path) -> Path:
    """Set ``home`` up as `farmhand init` does: starter policy and coordinator key."""
    from farmhand.cli.setup import ensure_initialised
    from farmhand.config import load

    ensure_initialised(load(home=home))
    return home


def signed_coordinator(store: Store, home: Path) -> Coordinator:
    """A coordinator on ``store``, signing with the key of ``home``, as the CLI does."""
    from farmhand.config import load
    from farmhand.coordinator import Coordinator
    from farmhand.keys import Keyring

    home = init_home(home)
    settings = load(home=home)
    signer = Keyring(home / "keys").signer("coordinator")
    return Coordinator(store, policy=settings.policy, signer=signer)


def warm_bytecode(opts: Options) -> None:
    """Create the run's shared bytecode cache and fill it with what subprocesses import."""
    cache = Path(tempfile.mkdtemp(prefix="farmhand-bench-pycache-", dir=opts.tmpdir))
    opts.pycache = str(cache)
    env = child_env(cache, opts)
    modules = (
        "farmhand.cli.main, farmhand.cli.parse, farmhand.config, farmhand.coordinator,"
        " farmhand.executor, farmhand.store.sqlite, farmhand.connectors.noop"
    )
    for argv in ([sys.executable, "-c", f"import {modules}"], [str(farmhand_bin()), "--version"]):
        subprocess.run(argv, env=env, cwd=cache, capture_output=True, check=True)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 30000")
    return db


def children_cpu() -> float:
    """User + system CPU seconds of every child process reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


# -- farmhand side ------------------------------------------------------------------------


async def preload(url: str, home: Path, n: int, chunk: int) -> None:
    """Submit ``n`` ``noop`` intents in chunks of ``chunk``, each chunk signed together with
    ``home``'s key (one batch signature), as an agent submitting in bulk does."""
    from farmhand.coordinator import SubmitRequest, Submitted
    from farmhand.store import open_store

    store = await open_store(url)
    try:
        co = signed_coordinator(store, home)
        for start in range(0, n, chunk):
            intents = co.build_intents(
                [
                    SubmitRequest(kind="noop", key=f"bench-{i}", payload={})
                    for i in range(start, min(n, start + chunk))
                ]
            )
            results = await co.submit_many(intents, actor="bench")
            if not all(isinstance(r, Submitted) and r.created for r in results):
                raise RuntimeError("pre-loading: some intents were not created")
    finally:
        await store.close()


async def _create_store(url: str) -> None:
    from farmhand.store import open_store

    await (await open_store(url)).close()


@dataclass
class Executors:
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    outs: list[Path]
    files: list[IO[bytes]]

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def close_files(self) -> None:
        for f in self.files:
            f.close()

    def kill_leftovers(self) -> None:
        for proc in self.alive():
            proc.kill()
            proc.wait()
        self.close_files()

    def failure(self, what: str) -> RuntimeError:
        logs = "\n".join(f"--- {log.name}\n{tail(log)}" for log in self.logs)
        codes = [p.returncode for p in self.procs]
        return RuntimeError(f"{what} (executor exit codes {codes})\n{logs}")

    def stats(self) -> list[dict[str, Any]]:
        found = []
        for out in self.outs:
            try:
                found.append(json.loads(out.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                found.append({})
        return found


def start_executors(workdir: Path, url: str, opts: Options, drain: bool) -> Executors:
    exe = farmhand_bin()
    env = child_env(workdir, opts)
    group = Executors([], [], [], [])
    for i in range(opts.executors):
        log, out = workdir / f"executor{i}.log", workdir / f"executor{i}.json"
        err_f, out_f = log.open("wb"), out.open("wb")
        group.files += [err_f, out_f]
        group.logs.append(log)
        group.outs.append(out)
        args = [
            str(exe),
            "executor",
            "run",
            "--concurrency",
            str(opts.concurrency),
            "--store",
            url,
            "--id",
            f"bench-ex{i}",
            "--grace",
            "5",
            "--json",
        ]
        if drain:
            args.append("--drain")
        group.procs.append(subprocess.Popen(args, stdout=out_f, stderr=err_f, env=env, cwd=workdir))
    return group


def drain(workdir: Path, url: str, opts: Any) -> tuple[float, float, Executors]:
    """Run ``opts.executors`` executors with ``--drain`` until they exit: wall seconds, their
    CPU seconds, and the group (for its stats). Raises if one failed."""
    t, cpu = time.perf_counter(), children_cpu()
    group = start_executors(workdir, url, opts, drain=True)
    try:
        for proc in group.procs:
            proc.wait(timeout=900)
        wall_s = time.perf_counter() - t
        cpu_s = children_cpu() - cpu
    finally:
        group.kill_leftovers()
    if any(p.returncode != 0 for p in group.procs):
        raise group.failure("an executor failed")
    return wall_s, cpu_s, group


def wait_until_listening(group: Executors, timeout: float = 30.0) -> float:
    """Wait for every executor's start-up log line; returns the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if len(group.alive()) < len(group.procs):
            raise group.failure("an executor exited during start-up")
        if all(", concurrency " in tail(log, 50) for log in group.logs):
            return time.perf_counter() - started
        time.sleep(0.01)
    raise group.failure("executors did not report start-up in time")


@dataclass
class ThroughputResult:
    intents: int
    executors: int
    concurrency: int
    preload_s: float
    wall_s: float
    wall_rate: float
    steady_s: float
    steady_rate: float
    startup_to_first_attempt_s: float
    #: user + system CPU of the executor processes, start-up included
    cpu_s: float
    cpu_us_per_intent: float
    exactly_once: bool
    check: dict[str, int]
    per_executor_succeeded: list[int]


def measure_throughput(opts: Options) -> ThroughputResult:
    n = opts.intents
    with fresh_dir("throughput", opts) as workdir:
        db_path = workdir / "farmhand.db"
        url = f"sqlite://{db_path}"
        progress(f"throughput: pre-loading {n:,} intents (submit_many, {opts.chunk:,} a chunk)")
        t = time.perf_counter()
        asyncio.run(preload(url, workdir / "home", n, opts.chunk))
        preload_s = time.perf_counter() - t
        progress(
            f"throughput: pre-loaded in {preload_s:.1f}s; draining with {opts.executors} "
            f"executors, --concurrency {opts.concurrency}"
        )
        wall_start = time.time()
        wall_s, cpu_s, group = drain(workdir, url, opts)

        db = connect(db_path, readonly=True)
        try:
            (first,) = db.execute("SELECT min(started_at) FROM attempts").fetchone()
            (last,) = db.execute("SELECT max(finished_at) FROM receipts").fetchone()
            check = {
                "intents": db.execute("SELECT count(*) FROM intents").fetchone()[0],
                "intents_succeeded": db.execute(
                    "SELECT count(*) FROM intents WHERE state = 'succeeded'"
                ).fetchone()[0],
                "attempts": db.execute("SELECT count(*) FROM attempts").fetchone()[0],
                "receipts": db.execute("SELECT count(*) FROM receipts").fetchone()[0],
                "succeeded_receipts": db.execute(
                    "SELECT count(*) FROM receipts WHERE outcome = 'succeeded'"
                ).fetchone()[0],
                "intents_with_one_succeeded_receipt": db.execute(
                    "SELECT count(*) FROM (SELECT r.intent_id FROM receipts r JOIN intents i"
                    " ON i.id = r.intent_id WHERE r.outcome = 'succeeded'"
                    " GROUP BY r.intent_id HAVING count(*) = 1)"
                ).fetchone()[0],
            }
        finally:
            db.close()
        per_executor = [int(s.get("succeeded", -1)) for s in group.stats()]
    exactly_once = (
        check["intents"] == n
        and check["intents_succeeded"] == n
        and check["succeeded_receipts"] == n
        and check["intents_with_one_succeeded_receipt"] == n
    )
    steady_s = (last - first) if first is not None and last is not None else math.nan
    return ThroughputResult(
        intents=n,
        executors=opts.executors,
        concurrency=opts.concurrency,
        preload_s=preload_s,
        wall_s=wall_s,
        wall_rate=n / wall_s,
        steady_s=steady_s,
        steady_rate=n / steady_s if steady_s > 0 else math.nan,
        startup_to_first_attempt_s=(first - wall_start) if first is not None else math.nan,
        cpu_s=cpu_s,
        cpu_us_per_intent=cpu_s / n * 1e6,
        exactly_once=exactly_once,
        check=check,
        per_executor_succeeded=per_executor,
    )


@dataclass
class LatencyResult:
    offered_rate: float
    achieved_rate: float
    submitted: int
    completed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    #: submit -> pick-up (farmhand: attempt started_at; baseline: claimed_at)
    pickup_p50_ms: float
    pickup_p95_ms: float
    pickup_p99_ms: float
    submit_call_p50_ms: float
    submit_call_p95_ms: float
    max_schedule_lag_ms: float


@dataclass
class Pacing:
    """What the producer side did: achieved rate, per-submit cost, how late it fell."""

    achieved_rate: float = 0.0
    call_ms: list[float] = field(default_factory=list)
    max_lag_ms: float = 0.0


def latency_result(
    rate: float, total: int, pacing: Pacing, rows: list[tuple[float, float]]
) -> LatencyResult:
    """``rows``: (submit -> receipt, submit -> pick-up) in seconds, one per completed intent."""
    ms = sorted(row[0] * 1000 for row in rows)
    pickup = sorted(row[1] * 1000 for row in rows)
    calls = sorted(pacing.call_ms)
    return LatencyResult(
        offered_rate=rate,
        achieved_rate=pacing.achieved_rate,
        submitted=total,
        completed=len(ms),
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        max_ms=ms[-1] if ms else math.nan,
        mean_ms=statistics.fmean(ms) if ms else math.nan,
        pickup_p50_ms=percentile(pickup, 50),
        pickup_p95_ms=percentile(pickup, 95),
        pickup_p99_ms=percentile(pickup, 99),
        submit_call_p50_ms=percentile(calls, 50),
        submit_call_p95_ms=percentile(calls, 95),
        max_schedule_lag_ms=pacing.max_lag_ms,
    )


async def offered_submits(url: str, home: Path, rate: float, total: int) -> Pacing:
    """Submit ``total`` intents one at a time at ``rate``/s on an absolute schedule."""
    from farmhand.coordinator import SubmitRequest
    from farmhand.store import open_store

    store = await open_store(url)
    pacing = Pacing()
    try:
        co = signed_coordinator(store, home)
        start = time.perf_counter() + 0.05
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            began = time.perf_counter()
            pacing.max_lag_ms = max(pacing.max_lag_ms, (began - due) * 1000)
            request = SubmitRequest(kind="noop", key=f"lat-{i}", payload={})
            await co.submit(request, actor="bench")
            pacing.call_ms.append((time.perf_counter() - began) * 1000)
        pacing.achieved_rate = total / (time.perf_counter() - start)
    finally:
        await store.close()
    return pacing


def wait_for_count(
    db_path: Path, sql: str, want: int, timeout: float, alive: Callable[[], bool]
) -> int:
    db = connect(db_path, readonly=True)
    try:
        deadline = time.perf_counter() + timeout
        while True:
            (have,) = db.execute(sql).fetchone()
            if have >= want or time.perf_counter() > deadline or not alive():
                return int(have)
            time.sleep(0.02)
    finally:
        db.close()


def measure_latency(opts: Options) -> LatencyResult:
    total = max(1, round(opts.rate * opts.duration))
    with fresh_dir("latency", opts) as workdir:
        db_path = workdir / "farmhand.db"
        url = f"sqlite://{db_path}"
        asyncio.run(_create_store(url))
        group = start_executors(workdir, url, opts, drain=False)
        try:
            took = wait_until_listening(group)
            time.sleep(0.3)  # let both reach their idle wait
            progress(
                f"latency: executors up in {took:.2f}s; submitting {total:,} intents at "
                f"{opts.rate:g}/s, one transaction each"
            )
            pacing = asyncio.run(offered_submits(url, workdir / "home", opts.rate, total))
            done = wait_for_count(
                db_path,
                "SELECT count(*) FROM receipts",
                total,
                60.0,
                lambda: len(group.alive()) == len(group.procs),
            )
            if done < total:
                raise group.failure(f"only {done} of {total} receipts arrived")
            for proc in group.procs:
                proc.send_signal(signal.SIGTERM)
            for proc in group.procs:
                proc.wait(timeout=30)
        finally:
            group.kill_leftovers()
        if any(p.returncode != 0 for p in group.procs):
            raise group.failure("an executor failed")
        db = connect(db_path, readonly=True)
        try:
            rows = db.execute(
                "SELECT r.finished_at - i.created_at, a.started_at - i.created_at"
                " FROM receipts r JOIN intents i ON i.id = r.intent_id"
                " JOIN attempts a ON a.intent_id = r.intent_id AND a.attempt = r.attempt"
                " WHERE r.outcome = 'succeeded'"
            ).fetchall()
        finally:
            db.close()
    return latency_result(opts.rate, total, pacing, rows)


# -- baseline: a plain SQLite job queue -----------------------------------------------------

QUEUE_SCHEMA = """
CREATE TABLE jobs (
    id         INTEGER PRIMARY KEY,
    payload    TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'pending',
    owner      TEXT,
    created_at REAL NOT NULL,
    claimed_at REAL,
    done_at    REAL
);
CREATE INDEX jobs_pending ON jobs (id) WHERE state = 'pending';
"""


def queue_connect(path: Path) -> sqlite3.Connection:
    """Same durability as farmhand's store: WAL, synchronous=FULL, autocommit off by hand."""
    db = connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    return db


def queue_create(path: Path) -> None:
    db = queue_connect(path)
    db.executescript(QUEUE_SCHEMA)
    db.close()


def queue_payload(i: int) -> str:
    # about the size of a farmhand intent body, so rows weigh roughly the same
    return json.dumps(
        {"kind": "noop", "key": f"bench-{i}", "account": "default", "agent": "local"}
        | {"payload": {}, "max_attempts": 5, "created_at": time.time()}
    )


def queue_preload(path: Path, n: int) -> None:
    db = queue_connect(path)
    db.execute("BEGIN IMMEDIATE")
    now = time.time()
    db.executemany(
        "INSERT INTO jobs (payload, created_at) VALUES (?, ?)",
        ((queue_payload(i), now) for i in range(n)),
    )
    db.execute("COMMIT")
    db.close()


def queue_submit(db: sqlite3.Connection, i: int) -> None:
    created = time.time()
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO jobs (payload, created_at) VALUES (?, ?)", (queue_payload(i), created))
    db.execute("COMMIT")


def queue_worker(
    path: str, name: str, batch: int, drain: bool, ready: EventType, stop: EventType
) -> None:
    """One worker process: claim a batch in one transaction, mark it done in another."""
    db = queue_connect(Path(path))
    watch = connect(Path(path))  # like farmhand: a second connection just for data_version
    ready.set()

    def version() -> int:
        return int(watch.execute("PRAGMA data_version").fetchone()[0])

    while not stop.is_set():
        since = version()
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute(
            "UPDATE jobs SET state = 'running', owner = ?, claimed_at = ?"
            " WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT ?)"
            " RETURNING id, payload",
            (name, time.time(), batch),
        ).fetchall()
        db.execute("COMMIT")
        if rows:
            for _, payload in rows:  # the "work": decode what a connector would receive
                json.loads(payload)
            ids = [row[0] for row in rows]
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                f"UPDATE jobs SET state = 'done', done_at = ? WHERE id IN "
                f"({','.join('?' * len(ids))})",
                (time.time(), *ids),
            )
            db.execute("COMMIT")
            continue
        if drain:
            break
        interval, deadline = POLL_MIN, time.monotonic() + 1.0
        while version() == since and not stop.is_set() and time.monotonic() < deadline:
            time.sleep(interval)
            interval = min(interval * POLL_GROWTH, POLL_MAX)
    db.close()
    watch.close()


@dataclass
class QueueWorkers:
    procs: list[multiprocessing.process.BaseProcess]
    ready: list[EventType]
    stop: EventType

    def wait_ready(self, timeout: float = 30.0) -> None:
        for event in self.ready:
            if not event.wait(timeout):
                raise RuntimeError("a baseline worker did not start")

    def join(self, timeout: float) -> None:
        for proc in self.procs:
            proc.join(timeout)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        codes = [p.exitcode for p in self.procs]
        if any(code != 0 for code in codes):
            raise RuntimeError(f"baseline worker failed (exit codes {codes})")


def start_queue_workers(path: Path, count: int, batch: int, drain: bool) -> QueueWorkers:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    ready = [ctx.Event() for _ in range(count)]
    procs: list[multiprocessing.process.BaseProcess] = [
        ctx.Process(
            target=queue_worker,
            args=(str(path), f"w{i}", batch, drain, ready[i], stop),
            name=f"bench-queue-w{i}",
        )
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    return QueueWorkers(procs, ready, stop)


@dataclass
class QueueThroughputResult:
    jobs: int
    workers: int
    batch: int
    wall_s: float
    wall_rate: float
    steady_s: float
    steady_rate: float
    cpu_s: float
    cpu_us_per_intent: float
    all_done: bool


def measure_queue_throughput(opts: Options) -> QueueThroughputResult:
    n = opts.intents
    with fresh_dir("queue-throughput", opts) as workdir:
        path = workdir / "queue.db"
        queue_create(path)
        queue_preload(path, n)
        progress(
            f"baseline queue: draining {n:,} jobs with {opts.executors} worker processes, "
            f"batches of {opts.batch}"
        )
        t, cpu = time.perf_counter(), children_cpu()
        workers = start_queue_workers(path, opts.executors, opts.batch, drain=True)
        workers.join(600)
        wall_s = time.perf_counter() - t
        cpu_s = children_cpu() - cpu
        db = connect(path, readonly=True)
        try:
            first, last, done = db.execute(
                "SELECT min(claimed_at), max(done_at), count(done_at) FROM jobs"
            ).fetchone()
        finally:
            db.close()
    steady_s = last - first
    return QueueThroughputResult(
        jobs=n,
        workers=opts.executors,
        batch=opts.batch,
        wall_s=wall_s,
        wall_rate=n / wall_s,
        steady_s=steady_s,
        steady_rate=n / steady_s if steady_s > 0 else math.nan,
        cpu_s=cpu_s,
        cpu_us_per_intent=cpu_s / n * 1e6,
        all_done=done == n,
    )


def measure_queue_latency(opts: Options) -> LatencyResult:
    total = max(1, round(opts.rate * opts.duration))
    with fresh_dir("queue-latency", opts) as workdir:
        path = workdir / "queue.db"
        queue_create(path)
        workers = start_queue_workers(path, opts.executors, opts.batch, drain=False)
        try:
            workers.wait_ready()
            time.sleep(0.3)
            progress(f"baseline queue: submitting {total:,} jobs at {opts.rate:g}/s")
            db = queue_connect(path)
            pacing = Pacing()
            start = time.perf_counter() + 0.05
            for i in range(total):
                due = start + i / opts.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                began = time.perf_counter()
                pacing.max_lag_ms = max(pacing.max_lag_ms, (began - due) * 1000)
                queue_submit(db, i)
                pacing.call_ms.append((time.perf_counter() - began) * 1000)
            pacing.achieved_rate = total / (time.perf_counter() - start)
            db.close()
            wait_for_count(
                path,
                "SELECT count(*) FROM jobs WHERE done_at IS NOT NULL",
                total,
                60.0,
                lambda: all(p.is_alive() for p in workers.procs),
            )
        finally:
            workers.stop.set()
            workers.join(30)
        db = connect(path, readonly=True)
        try:
            rows = db.execute(
                "SELECT done_at - created_at, claimed_at - created_at FROM jobs"
                " WHERE done_at IS NOT NULL"
            ).fetchall()
        finally:
            db.close()
    return latency_result(opts.rate, total, pacing, rows)


# -- CLI start-up ----------------------------------------------------------------------------


@dataclass
class Timing:
    command: str
    runs: int
    median_ms: float
    min_ms: float
    max_ms: float
    #: user + system CPU of the process: unlike wall time, barely moved by other load
    cpu_median_ms: float


def time_command(
    label: str, argv: Callable[[int], list[str]], runs: int, env: dict[str, str], cwd: Path
) -> Timing:
    """Median wall time of a command (one untimed warm-up run first)."""
    samples, cpu = [], []
    for i in range(runs + 1):
        began, cpu_before = time.perf_counter(), children_cpu()
        done = subprocess.run(argv(i), env=env, cwd=cwd, capture_output=True, check=False)
        took = (time.perf_counter() - began) * 1000
        if done.returncode != 0:
            raise RuntimeError(
                f"{label} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
            )
        if i > 0:
            samples.append(took)
            cpu.append((children_cpu() - cpu_before) * 1000)
    return Timing(
        label,
        runs,
        statistics.median(samples),
        min(samples),
        max(samples),
        statistics.median(cpu),
    )


def measure_cli(opts: Options) -> dict[str, Timing]:
    exe, python = str(farmhand_bin()), sys.executable
    with fresh_dir("cli", opts) as workdir:
        env = child_env(workdir, opts)
        url = f"sqlite://{workdir / 'farmhand.db'}"
        store = ["--store", url]
        asyncio.run(_create_store(url))
        progress(f"CLI: {opts.cli_runs} runs each of python -c pass, farmhand --version, submit")
        runs = opts.cli_runs
        out = {
            "python": time_command(
                "python -c pass", lambda _: [python, "-c", "pass"], runs, env, workdir
            ),
            "import": time_command(
                "python -c 'import farmhand.cli.main'",
                lambda _: [python, "-c", "import farmhand.cli.main"],
                runs,
                env,
                workdir,
            ),
            "version": time_command(
                "farmhand --version", lambda _: [exe, "--version"], runs, env, workdir
            ),
            "submit": time_command(
                "farmhand submit noop",
                lambda i: [exe, "submit", "noop", "--key", f"cli-{i}", "--payload", "{}", *store],
                runs,
                env,
                workdir,
            ),
        }
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            out["submit_no_pyc"] = time_command(
                "farmhand submit, PYTHONDONTWRITEBYTECODE=1 as here",
                lambda i: [exe, "submit", "noop", "--key", f"raw-{i}", "--payload", "{}", *store],
                runs,
                child_env(workdir, opts, bytecode=False),
                workdir,
            )
        return out


# -- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}/s" if math.isfinite(value) else "n/a"


def fmt_ms(value: float) -> str:
    return f"{value:,.1f} ms" if math.isfinite(value) else "n/a"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and math.isfinite(a) and math.isfinite(b) else "n/a"


def render(results: dict[str, Any], opts: Options) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []
    env = results["environment"]
    head = (
        f"farmhand SQLite benchmark: {env['cpus']} CPUs, Python {env['python']}, "
        f"SQLite {env['sqlite']}, temp dir {env['tmpdir']}, load average "
        f"{env['loadavg_start']:.2f} at start / {env['loadavg_end']:.2f} at end"
    )
    if max(env["loadavg_start"], env["loadavg_end"]) > 0.5 * (env["cpus"] or 1):
        head += "\nWARNING: other processes were busy on this host; wall-clock figures are noisy"

    tp, qtp = results.get("throughput"), results.get("baseline_throughput")
    if isinstance(tp, dict) and isinstance(qtp, dict):
        title = f"throughput, {tp['intents']:,} noop, {tp['executors']} procs"
        rows.append(
            (
                f"{title}: wall incl. start-up",
                fmt_rate(tp["wall_rate"]),
                fmt_rate(qtp["wall_rate"]),
                ratio(tp["wall_rate"], qtp["wall_rate"]),
                f">= {TARGET_THROUGHPUT:,.0f}/s {verdict(tp['wall_rate'] >= TARGET_THROUGHPUT)}",
            )
        )
        rows.append(
            (
                "  steady (1st attempt -> last receipt)",
                fmt_rate(tp["steady_rate"]),
                fmt_rate(qtp["steady_rate"]),
                ratio(tp["steady_rate"], qtp["steady_rate"]),
                f">= {TARGET_THROUGHPUT:,.0f}/s {verdict(tp['steady_rate'] >= TARGET_THROUGHPUT)}",
            )
        )
        rows.append(
            (
                "  wall time",
                f"{tp['wall_s']:.2f} s",
                f"{qtp['wall_s']:.2f} s",
                ratio(tp["wall_s"], qtp["wall_s"]),
                "",
            )
        )
        rows.append(
            (
                "  CPU per intent, all processes",
                f"{tp['cpu_us_per_intent']:,.0f} us",
                f"{qtp['cpu_us_per_intent']:,.0f} us",
                ratio(tp["cpu_us_per_intent"], qtp["cpu_us_per_intent"]),
                "",
            )
        )
        c = tp["check"]
        notes.append(
            f"exactly-once check: {'PASSED' if tp['exactly_once'] else 'FAILED'}: "
            f"{c['intents_succeeded']:,}/{c['intents']:,} intents succeeded, "
            f"{c['intents_with_one_succeeded_receipt']:,} with exactly one succeeded receipt, "
            f"{c['receipts']:,} receipts, {c['attempts']:,} attempts; per executor "
            f"{tp['per_executor_succeeded']}; baseline all done: {qtp['all_done']}"
        )
        notes.append(
            f"farmhand: pre-load {tp['preload_s']:.1f}s (not timed); executor launch -> first "
            f"attempt {tp['startup_to_first_attempt_s'] * 1000:.0f} ms of the wall time"
        )
        notes.append(
            f"reference: huey on SQLite drains about {HUEY_SQLITE_JOBS_PER_S:,} jobs/s on this "
            f"class of machine; target >= {TARGET_THROUGHPUT:,.0f} intents/s end to end"
        )
    for key in ("throughput", "baseline_throughput"):
        if isinstance(results.get(key), str):
            notes.append(f"{key} FAILED: {results[key]}")

    lat, qlat = results.get("latency"), results.get("baseline_latency")
    if isinstance(lat, dict) and isinstance(qlat, dict):
        title = f"latency submit->receipt @ {lat['offered_rate']:g}/s"
        for i, name in enumerate(("p50", "p95", "p99", "max")):
            key = f"{name}_ms"
            goal = ""
            if name == "p95":
                goal = f"< {TARGET_P95_MS:g} ms {verdict(lat['p95_ms'] < TARGET_P95_MS)}"
            rows.append(
                (
                    f"{title}: {name}" if i == 0 else f"  {name}",
                    fmt_ms(lat[key]),
                    fmt_ms(qlat[key]),
                    ratio(lat[key], qlat[key]),
                    goal,
                )
            )
        for name in ("p50", "p95", "p99"):
            key = f"pickup_{name}_ms"
            rows.append(
                (
                    f"  of which pick-up, {name}",
                    fmt_ms(lat[key]),
                    fmt_ms(qlat[key]),
                    ratio(lat[key], qlat[key]),
                    "",
                )
            )
        rows.append(
            (
                "  producer: one submit call, p50",
                fmt_ms(lat["submit_call_p50_ms"]),
                fmt_ms(qlat["submit_call_p50_ms"]),
                ratio(lat["submit_call_p50_ms"], qlat["submit_call_p50_ms"]),
                "",
            )
        )
        notes.append(
            f"offered {lat['offered_rate']:g}/s for {lat['submitted']:,} intents; achieved "
            f"{lat['achieved_rate']:.1f}/s (baseline {qlat['achieved_rate']:.1f}/s), producer "
            f"fell at most {lat['max_schedule_lag_ms']:.1f} ms behind schedule "
            f"(baseline {qlat['max_schedule_lag_ms']:.1f} ms); {lat['completed']:,} receipts"
        )
        notes.append(
            "latency = receipt finished_at (taken when the call returns, before the receipt's "
            "commit) - intent created_at (taken before the submit transaction); pick-up = "
            "attempt started_at (baseline: claimed_at) - created_at"
        )
    for key in ("latency", "baseline_latency"):
        if isinstance(results.get(key), str):
            notes.append(f"{key} FAILED: {results[key]}")

    cli = results.get("cli")
    if isinstance(cli, dict):
        floor = cli["python"]["median_ms"]
        targets: dict[str, float | None] = {"submit": TARGET_SUBMIT_MS}
        for key, t in cli.items():
            target = targets.get(key)
            rows.append(
                (
                    f"CLI median of {t['runs']}: {t['command']}",
                    fmt_ms(t["median_ms"]),
                    fmt_ms(floor) if key != "python" else "(floor)",
                    f"+{t['median_ms'] - floor:.0f} ms" if key != "python" else "",
                    f"< {target:g} ms {verdict(t['median_ms'] < target)}" if target else "",
                )
            )
        notes.append(
            "CLI CPU (user+sys) medians, less sensitive to other load than wall time: "
            + ", ".join(f"{t['command']} {t['cpu_median_ms']:.0f} ms" for t in cli.values())
        )
        notes.append(
            "CLI and executors load bytecode from a cache in the run's temp dir, as an "
            "installed package would (PYTHONPYCACHEPREFIX)"
        )
    elif isinstance(cli, str):
        notes.append(f"cli FAILED: {cli}")

    header = ("measurement", "farmhand", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    line = "  ".join("-" * w for w in widths)

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i in (0, 4) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    out = [head, "", fmt(header), line, *(fmt(r) for r in rows), line]
    out += [
        "baseline = plain SQLite queue (no farmhand): same row count, same worker count, "
        f"batch {opts.batch}, WAL + synchronous=FULL; latency baseline polls PRAGMA data_version "
        "1..10 ms like farmhand",
        "ratio = farmhand / baseline (rates: higher is better; times, latencies, CPU: lower is "
        "better); CLI: time over the python -c pass floor",
    ]
    out += [f"- {n}" for n in notes]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


SECTIONS = ("throughput", "latency", "cli")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="Benchmark farmhand on SQLite against a plain-SQLite job queue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--intents", type=int, default=20_000, help="intents for the throughput run")
    p.add_argument(
        "--chunk", type=int, default=1_000, help="intents per submit_many when pre-loading"
    )
    p.add_argument(
        "--executors", type=int, default=2, help="executor (and baseline worker) processes"
    )
    p.add_argument("--concurrency", type=int, default=64, help="executor --concurrency")
    p.add_argument("--batch", type=int, default=64, help="baseline queue claim batch")
    p.add_argument("--rate", type=float, default=200.0, help="offered rate for latency, per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of offered load")
    p.add_argument("--cli-runs", type=int, default=15, help="timed runs per CLI command")
    p.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable); default: all",
    )
    p.add_argument("--tmpdir", help="where the per-measurement temp directories go")
    p.add_argument("--keep", action="store_true", help="keep the temp directories")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    a = p.parse_args(argv)
    if a.intents < 1 or a.chunk < 1 or a.executors < 1 or a.rate <= 0 or a.cli_runs < 1:
        p.error("sizes must be positive")
    return Options(
        intents=a.intents,
        chunk=a.chunk,
        executors=a.executors,
        concurrency=a.concurrency,
        batch=a.batch,
        rate=a.rate,
        duration=a.duration,
        cli_runs=a.cli_runs,
        sections=a.only or list(SECTIONS),
        tmpdir=a.tmpdir,
        keep=a.keep,
        as_json=a.json,
    )


def finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def run_section(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    try:
        value = fn()
    except Exception as exc:  # one broken section must not hide the others
        progress(f"{key} failed: {exc}")
        results[key] = f"{type(exc).__name__}: {exc}"
        return
    if isinstance(value, dict):
        results[key] = {k: asdict(v) for k, v in value.items()}
    else:
        results[key] = asdict(value)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    farmhand_bin()
    results: dict[str, Any] = {
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
            "tmpdir": opts.tmpdir or tempfile.gettempdir(),
            "loadavg_start": os.getloadavg()[0],
        },
        "options": asdict(opts),
        "targets": {
            "throughput_per_s": TARGET_THROUGHPUT,
            "latency_p95_ms": TARGET_P95_MS,
            "cli_submit_ms": TARGET_SUBMIT_MS,
            "reference_huey_sqlite_jobs_per_s": HUEY_SQLITE_JOBS_PER_S,
        },
    }
    started = time.perf_counter()
    try:
        warm_bytecode(opts)
        if "throughput" in opts.sections:
            run_section(results, "throughput", lambda: measure_throughput(opts))
            run_section(results, "baseline_throughput", lambda: measure_queue_throughput(opts))
        if "latency" in opts.sections:
            run_section(results, "latency", lambda: measure_latency(opts))
            run_section(results, "baseline_latency", lambda: measure_queue_latency(opts))
        if "cli" in opts.sections:
            run_section(results, "cli", lambda: measure_cli(opts))
    finally:
        if opts.pycache is not None and not opts.keep:
            shutil.rmtree(opts.pycache, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - started
    results["environment"]["loadavg_end"] = os.getloadavg()[0]
    progress(f"done in {results['elapsed_s']:.0f}s")
    if opts.as_json:
        sys.stdout.write(json.dumps(finite(results), allow_nan=False) + "\n")
    else:
        sys.stdout.write(render(results, opts) + "\n")
    failed = [k for k, v in results.items() if isinstance(v, str) and k not in ("elapsed_s",)]
    exact = results.get("throughput")
    if isinstance(exact, dict) and not exact["exactly_once"]:
        failed.append("exactly-once")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
