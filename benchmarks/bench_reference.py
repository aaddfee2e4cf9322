#!/usr/bin/env python3
"""Reference job queues measured in the same run: PgQueuer on PostgreSQL, huey on Redis.

``bench_servers.py`` compares farmhand's drain throughput with these two queues. A figure
quoted from another day says little on a shared 2-core machine whose speed moves by a third
with its load, so this script measures them on the same kind of throw-away server, with the
same drain shape: N no-op jobs pre-loaded (not timed), then W worker processes started and
timed from their spawn until every job is done, process start-up included.

PgQueuer (``pip install pgqueuer asyncpg``)
    Schema installed with ``Queries.install()`` (its default durability, ``durable``: every
    table logged) in a fresh database; N jobs enqueued with the batch form of
    ``Queries.enqueue`` (lists), 5,000 per statement. Each worker is ``pgq run
    bench_reference:pgqueuer_worker --batch-size B --mode drain`` (run as ``python -m
    pgqueuer``, so on uvloop as the CLI does), whose factory opens one asyncpg connection
    (the driver of PgQueuer's own examples and the CLI's first choice) and registers one
    async no-op entrypoint. Everything else is PgQueuer's default: no concurrency cap
    (``--max-concurrent-tasks``), 30 s heartbeat and dequeue timeouts, INFO logging, the
    scheduler beside the queue manager, as ``PgQueuer.run`` does. Drain mode makes each
    worker exit once the queue is empty, so the wall time is spawn -> both exited, as for
    farmhand's executors.
    Exactly once: ``pgqueuer_log`` holds one ``picked`` and one ``successful`` row for every
    job and nothing else after ``queued``, and the queue table is empty.

huey (``pip install huey``)
    ``RedisHuey`` (its defaults: blocking ``BRPOP`` reads, results stored) under a fresh name
    (huey's key namespace) on the given Redis database; N tasks enqueued with ``task.map``
    (huey has no bulk enqueue: one ``LPUSH`` each). Each worker is ``huey_consumer
    bench_reference.huey_app --workers 1 --worker-type thread`` (run as ``python -m
    huey.bin.huey_consumer``), so W consumer processes of one worker thread each; huey takes
    one task per read, so the batch size does not apply. Its default INFO logging (two lines
    per task) goes to a file. huey has no drain mode, so the wall time is spawn -> the last
    task's result stored (the result count is polled every 5 ms); the consumers are then
    stopped with SIGINT, huey's graceful stop. The no-op task returns its index, so that a
    result is stored for each one (huey stores no ``None``). Exactly once: N results, whose
    values are exactly 0 … N-1, under the N task ids enqueued, and an empty queue.

Every job carries a JSON body about the size of a farmhand intent (~200 bytes), which the
no-op ignores. The servers are throw-away ones started on loopback (PostgreSQL with fsync
on, Redis with AOF ``appendfsync everysec``, as in bench_servers.py) unless ``--postgres`` /
``--redis`` name one. Progress goes to stderr, the table (or ``--json``) to stdout::

    .venv/bin/python benchmarks/bench_reference.py                  # both queues
    .venv/bin/python benchmarks/bench_reference.py --queue huey --jobs 2000 --json

``reference_drain(backend, url, jobs, workers, batch)`` returns the jobs/s of the reference
queue of ``backend`` ("postgres": PgQueuer, "redis": huey) on the server at ``url``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

#: reference queue of each server kind
QUEUE_OF = {"postgres": "pgqueuer", "redis": "huey"}
BACKEND_OF = {queue: backend for backend, queue in QUEUE_OF.items()}
#: Python modules each queue needs, and the versions this script was written against
NEEDS = {"pgqueuer": ("pgqueuer", "asyncpg"), "huey": ("huey", "redis")}
INSTALL = "pip install pgqueuer==1.6.0 asyncpg==0.32.0 huey==3.5.4"

ENTRYPOINT = "noop"
ENQUEUE_CHUNK = 5_000
POLL_S = 0.005
TIMEOUT_S = 900.0
#: this file's module name in the worker processes (benchmarks/ is on their sys.path)
MODULE = "bench_reference"
URL_ENV, NAME_ENV = "BENCH_REFERENCE_REDIS_URL", "BENCH_REFERENCE_HUEY_NAME"

_T0 = time.perf_counter()
_serial = itertools.count(1)


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    sys.stderr.write(f"[{time.perf_counter() - _T0:6.1f}s] {message}\n")
    sys.stderr.flush()


def missing(queues: Sequence[str]) -> list[str]:
    """The Python modules the given queues need that are not installed."""
    wanted = dict.fromkeys(m for q in queues for m in NEEDS[q])
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def versions(queue: str) -> dict[str, str]:
    return {m: importlib.metadata.version(m) for m in NEEDS[queue]}


def job_body(i: int) -> str:
    # about the size of a farmhand intent body, as bench_servers' raw baseline sends
    return json.dumps(
        {"kind": "noop", "key": f"bench-{i}", "account": "default", "agent": "local"}
        | {"payload": {}, "max_attempts": 5, "created_at": time.time()}
    )


def unique_name(queue: str) -> str:
    return f"bench_ref_{queue}_{os.getpid()}_{next(_serial)}"


# children_cpu and tail repeat bench_sqlite.py's on purpose: the reference queues' workers
# import this module, and importing bench_sqlite (sqlite3, multiprocessing, ...) would add to
# their start-up, which their drain time counts


def children_cpu() -> float:
    """User + system CPU seconds of every child process reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class RefDrain:
    queue: str
    backend: str
    n: int
    workers: int
    #: claim batch (None: the queue takes one job per read)
    batch: int | None
    #: spawn -> drained (PgQueuer: all workers exited; huey: last result stored)
    wall_s: float
    wall_rate: float
    #: first job picked / result seen -> last job done
    steady_rate: float
    cpu_us_per_job: float
    exactly_once: bool
    versions: dict[str, str]
    counts: dict[str, Any] = field(default_factory=dict)


class Workers:
    """Worker processes started with ``subprocess``, each logging to its own file."""

    def __init__(self, argv: list[str], n: int, workdir: Path, env: dict[str, str]) -> None:
        self.logs = [workdir / f"worker-{i}.log" for i in range(n)]
        self._files: list[IO[bytes]] = [log.open("wb") for log in self.logs]
        self.procs = [
            subprocess.Popen(
                argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f
            )
            for f in self._files
        ]

    def failed(self) -> list[int]:
        """Exit codes of the workers that ended with an error so far."""
        return [c for c in (p.poll() for p in self.procs) if c not in (None, 0)]

    def failure(self, what: str) -> RuntimeError:
        logs = "\n".join(f"--- {log.name}\n{tail(log)}" for log in self.logs)
        return RuntimeError(f"{what} (exit codes {[p.poll() for p in self.procs]})\n{logs}")

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        """Kill whatever is still running (after a failure) and close the log files."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()


def worker_env() -> dict[str, str]:
    """Environment of the workers: this file importable, no queue settings from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGQUEUER_", "BENCH_"))}
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def work_dir(name: str, keep: bool = False, tmpdir: str | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"farmhand-bench-{name}-", dir=tmpdir))
    try:
        yield path
    finally:
        if keep:
            progress(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- PgQueuer -----------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (query string kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def fresh_database(url: str, name: str) -> Iterator[str]:
    """A new empty database on the server of ``url``, dropped afterwards."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def pgqueuer_worker(args: list[str]) -> AsyncIterator[Any]:
    """``pgq run`` factory: a PgQueuer on one asyncpg connection to ``args[0]``, one no-op
    entrypoint."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver

    connection = await asyncpg.connect(args[0])
    try:
        pgq = PgQueuer(AsyncpgDriver(connection))

        @pgq.entrypoint(ENTRYPOINT)
        async def noop(job: Any) -> None:
            pass

        yield pgq
    finally:
        await connection.close()


async def pgqueuer_preload(url: str, n: int) -> None:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(connection))
        await queries.install()
        for start in range(0, n, ENQUEUE_CHUNK):
            k = min(ENQUEUE_CHUNK, n - start)
            bodies: list[bytes | None] = [job_body(i).encode() for i in range(start, start + k)]
            await queries.enqueue([ENTRYPOINT] * k, bodies, [0] * k)
    finally:
        await connection.close()


async def pgqueuer_counts(url: str) -> dict[str, Any]:
    """What the queue and log tables say after the drain."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(url)
    try:
        settings = Queries(AsyncpgDriver(connection)).qbe.settings
        left = await connection.fetchval(f"SELECT count(*) FROM {settings.queue_table}")
        rows = await connection.fetch(
            "SELECT status::text AS status, count(*) AS n, count(DISTINCT job_id) AS jobs,"
            " extract(epoch FROM min(created)) AS first,"
            f" extract(epoch FROM max(created)) AS last FROM {settings.queue_table_log}"
            " GROUP BY status"
        )
    finally:
        await connection.close()
    return {"left_in_queue": int(left)} | {
        r["status"]: {
            "rows": int(r["n"]),
            "jobs": int(r["jobs"]),
            "first": float(r["first"]),
            "last": float(r["last"]),
        }
        for r in rows
    }


def pgqueuer_drain(
    url: str, jobs: int, workers: int, batch: int, keep: bool = False, tmpdir: str | None = None
) -> RefDrain:
    name = unique_name("pgqueuer")
    with fresh_database(url, name) as db, work_dir("pgqueuer", keep, tmpdir) as workdir:
        progress(f"pgqueuer: installing the schema, enqueuing {jobs:,} jobs")
        asyncio.run(pgqueuer_preload(db, jobs))
        progress(f"pgqueuer: draining with {workers} workers, batch {batch}")
        argv = [sys.executable, "-m", "pgqueuer", "run", f"{MODULE}:pgqueuer_worker"]
        argv += ["--batch-size", str(batch), "--mode", "drain", "--", db]
        t, cpu = time.perf_counter(), children_cpu()
        group = Workers(argv, workers, workdir, worker_env())
        try:
            try:
                group.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise group.failure(f"workers still running after {TIMEOUT_S:g}s") from None
            wall = time.perf_counter() - t
            cpu_s = children_cpu() - cpu
            if group.failed():
                raise group.failure("a PgQueuer worker failed")
        finally:
            group.close()
        counts = asyncio.run(pgqueuer_counts(db))
    done, picked = counts.get("successful", {}), counts.get("picked", {})
    others = set(counts) - {"left_in_queue", "queued", "picked", "successful"}
    exactly_once = (
        counts["left_in_queue"] == 0
        and not others
        and done.get("rows") == done.get("jobs") == jobs
        and picked.get("rows") == picked.get("jobs") == jobs
    )
    span = done["last"] - picked["first"] if done and picked else 0.0
    return RefDrain(
        queue="pgqueuer",
        backend="postgres",
        n=jobs,
        workers=workers,
        batch=batch,
        wall_s=wall,
        wall_rate=jobs / wall,
        steady_rate=(jobs - 1) / span if span > 0 else float("nan"),
        cpu_us_per_job=cpu_s / jobs * 1e6,
        exactly_once=exactly_once,
        versions=versions("pgqueuer"),
        counts={k: v["rows"] if isinstance(v, dict) else v for k, v in counts.items()},
    )


# -- huey ---------------------------------------------------------------------------------


def huey_queue(url: str, name: str) -> tuple[Any, Any]:
    """A ``RedisHuey`` named ``name`` on ``url`` and its no-op task."""
    from huey import RedisHuey

    app = RedisHuey(name, url=url)

    def noop(i: int, body: str) -> int:
        return i

    # huey names a task after its function's module: the same name whether this file runs
    # as a script (``__main__``) or is imported, as in the consumers
    noop.__module__ = MODULE
    return app, app.task()(noop)


def __getattr__(name: str) -> Any:
    """``bench_reference.huey_app``, the consumers' huey, configured from the environment."""
    if name == "huey_app":
        app, _ = huey_queue(os.environ[URL_ENV], os.environ[NAME_ENV])
        globals()["huey_app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def huey_drain(
    url: str, jobs: int, workers: int, keep: bool = False, tmpdir: str | None = None
) -> RefDrain:
    name = unique_name("huey")
    app, task = huey_queue(url, name)
    try:
        with work_dir("huey", keep, tmpdir) as workdir:
            progress(f"huey: enqueuing {jobs:,} tasks under the name {name}")
            ids = {r.id for r in task.map((i, job_body(i)) for i in range(jobs))}
            progress(f"huey: draining with {workers} consumers of 1 worker thread")
            env = worker_env() | {URL_ENV: url, NAME_ENV: name}
            argv = [sys.executable, "-m", "huey.bin.huey_consumer", f"{MODULE}.huey_app"]
            argv += ["--workers", "1", "--worker-type", "thread"]
            t, cpu = time.perf_counter(), children_cpu()
            group = Workers(argv, workers, workdir, env)
            first = None
            try:
                while (have := app.storage.result_store_size()) < jobs:
                    if first is None and have:
                        first = (time.perf_counter(), have)
                    if group.failed():
                        raise group.failure("a huey consumer failed")
                    if time.perf_counter() - t > TIMEOUT_S:
                        raise group.failure(f"only {have} of {jobs} results after {TIMEOUT_S:g}s")
                    time.sleep(POLL_S)
                end = time.perf_counter()
                for proc in group.procs:
                    proc.send_signal(signal.SIGINT)
                try:
                    group.wait(60)
                except subprocess.TimeoutExpired:
                    raise group.failure("consumers did not stop on SIGINT") from None
                cpu_s = children_cpu() - cpu
                if group.failed():
                    raise group.failure("a huey consumer failed")
            finally:
                group.close()
        results = app.storage.result_items()
        values = sorted(app.serializer.deserialize(v) for v in results.values())
        pending = app.pending_count()
    finally:
        app.flush()
    exactly_once = pending == 0 and set(results) == ids and values == list(range(jobs))
    wall = end - t
    if first is not None and end > first[0]:
        steady = (jobs - first[1]) / (end - first[0])
    else:
        steady = float("nan")
    return RefDrain(
        queue="huey",
        backend="redis",
        n=jobs,
        workers=workers,
        batch=None,
        wall_s=wall,
        wall_rate=jobs / wall,
        steady_rate=steady,
        cpu_us_per_job=cpu_s / jobs * 1e6,
        exactly_once=exactly_once,
        versions=versions("huey"),
        counts={"results": len(results), "pending": pending},
    )


# -- entry points -------------------------------------------------------------------------


def measure(
    queue: str,
    url: str,
    jobs: int,
    workers: int,
    batch: int,
    keep: bool = False,
    tmpdir: str | None = None,
) -> RefDrain:
    """One drain of ``queue`` on the server at ``url`` (a fresh database / namespace)."""
    if absent := missing([queue]):
        raise RuntimeError(f"{queue} needs {', '.join(absent)}: {INSTALL}")
    if queue == "pgqueuer":
        return pgqueuer_drain(url, jobs, workers, batch, keep, tmpdir)
    return huey_drain(url, jobs, workers, keep, tmpdir)


def reference_drain(backend: str, url: str, jobs: int, workers: int, batch: int) -> float:
    """Jobs/s of the reference queue of ``backend`` draining ``jobs`` no-op jobs with
    ``workers`` worker processes, spawn to done: PgQueuer with ``batch`` on "postgres",
    huey (one task per read) on "redis".

    ``url`` is the server: any database on it for PostgreSQL (a new one is created and
    dropped), the Redis database for huey (a new key namespace is used and flushed). Raises
    RuntimeError if the queue's package is missing, a worker failed, or a job did not run
    exactly once.
    """
    result = measure(QUEUE_OF[backend], url, jobs, workers, batch)
    if not result.exactly_once:
        raise RuntimeError(f"{result.queue}: not every job ran exactly once: {result.counts}")
    return result.wall_rate


@contextlib.contextmanager
def server(backend: str, given: str | None) -> Iterator[str]:
    """The URL of ``given``, or of a throw-away server started for the block."""
    if given:
        yield given
        return
    from farmhand.testing.servers import LocalPostgres, LocalRedis

    local = LocalPostgres(durable=True) if backend == "postgres" else LocalRedis()
    with local:
        yield local.url


@dataclass
class Options:
    queues: list[str]
    jobs: int
    workers: int
    batch: int
    postgres: str | None
    redis: str | None
    keep: bool
    tmpdir: str | None
    as_json: bool


def render(results: dict[str, Any], opts: Options) -> str:
    lines = [
        f"reference queues: {opts.jobs:,} no-op jobs, {opts.workers} worker processes, "
        f"batch {opts.batch} (load average {os.getloadavg()[0]:.2f})",
        "",
        "| queue | server | drain, jobs/s end to end | steady jobs/s | CPU per job | "
        "exactly once | versions |",
        "|---|---|---|---|---|---|---|",
    ]
    for queue, r in results.items():
        if "error" in r:
            lines.append(f"| {queue} | {BACKEND_OF[queue]} | failed: {r['error']} | | | | |")
            continue
        batch = "" if r["batch"] is None else f", batch {r['batch']}"
        lines.append(
            f"| {queue} | {r['backend']} | **{r['wall_rate']:,.0f}** ({r['wall_s']:.2f} s"
            f"{batch}) | {r['steady_rate']:,.0f} | {r['cpu_us_per_job']:.0f} µs | "
            f"{'yes' if r['exactly_once'] else 'NO'} | "
            f"{', '.join(f'{k} {v}' for k, v in r['versions'].items())} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--queue", action="append", choices=("pgqueuer", "huey"))
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--batch", type=int, default=100, help="PgQueuer's --batch-size")
    parser.add_argument("--postgres", help="use this server (a database URL) for PgQueuer")
    parser.add_argument("--redis", help="use this Redis (URL with its database) for huey")
    parser.add_argument("--keep", action="store_true", help="keep the workers' logs")
    parser.add_argument("--tmpdir", help="where the workers' log directories go")
    parser.add_argument("--json", action="store_true", dest="as_json")
    a = parser.parse_args(argv)
    return Options(
        queues=list(dict.fromkeys(a.queue or ["pgqueuer", "huey"])),
        jobs=a.jobs,
        workers=a.workers,
        batch=a.batch,
        postgres=a.postgres,
        redis=a.redis,
        keep=a.keep,
        tmpdir=a.tmpdir,
        as_json=a.as_json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if absent := missing(opts.queues):
        print(f"bench_reference.py needs {', '.join(absent)}: {INSTALL}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    failed = False
    for queue in opts.queues:
        backend = BACKEND_OF[queue]
        try:
            with server(backend, opts.postgres if backend == "postgres" else opts.redis) as url:
                progress(f"{queue}: {backend} at {url}")
                result = measure(
                    queue, url, opts.jobs, opts.workers, opts.batch, opts.keep, opts.tmpdir
                )
            results[queue] = asdict(result)
            failed = failed or not result.exactly_once
        except Exception as exc:
            progress(f"{queue}: failed: {exc}")
            results[queue] = {"error": str(exc).splitlines()[0]}
            failed = True
    if opts.as_json:
        print(json.dumps(results, indent=1))
    else:
        print(render(results, opts))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
