"""Rate-limit buckets and circuit breakers on the folder store.

The bodies of :class:`farmhand.store.folder.FolderStore`'s ``take``, ``peek``, ``pause`` and
``breaker_*`` methods, run on its I/O thread. The decisions are
:mod:`farmhand.store.limits_logic`'s, shared with every store; here they run under the
node's host-local lock with ``now`` read once it is held, so the executor host's processes
share one timeline, and only what changed is written (a bucket's new ``tat``, a breaker's
new row), as one file.

Merging (folder_view.py): a bucket's ``tat`` and pause only grow, so the highest written by
any node stands; a breaker's latest row stands. Only the executor host takes tokens or
enters breakers, so in practice one node writes them all.
"""

from __future__ import annotations

from collections.abc import Sequence

from farmhand.config import BreakerConfig
from farmhand.store import limits_logic as logic
from farmhand.store.base import BreakerResult, BreakerStatus, Bucket, Throttle
from farmhand.store.folder_journal import Journal
from farmhand.store.folder_records import BreakerSet, BucketSet, Noted, Paused
from farmhand.store.folder_view import Batch


class FolderLimits:
    """Buckets and breakers of one folder-store connection."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def take(self, requests: list[tuple[Bucket, ...]]) -> list[Throttle]:
        """See :meth:`farmhand.store.base.Store.take`."""
        journal = self._journal
        names = [b.name for request in requests for b in request]
        if not any(b.limit is not None for request in requests for b in request):
            # only pauses can hold unlimited buckets: a read, nothing to write
            journal.refresh()
            rows = journal.view.bucket_rows(names)
            return logic.take(requests, rows, journal.clock.now())[0]
        with journal.locked():
            batch = journal.batch()
            rows = journal.view.bucket_rows(names)
            answers, changed = logic.take(requests, rows, batch.at)
            for name, tat in changed.items():
                batch.add(BucketSet(batch.origin(), name, tat))
            journal.commit(batch)
        return answers

    def peek(self, buckets: Sequence[Bucket]) -> Throttle:
        """See :meth:`farmhand.store.base.Store.peek`."""
        self._journal.refresh()
        rows = self._journal.view.bucket_rows(b.name for b in buckets)
        return logic.judge(buckets, rows, self._journal.clock.now())

    def pause(self, bucket: str, until: float, reason: str, actor: str) -> float:
        """See :meth:`farmhand.store.base.Store.pause`."""
        journal = self._journal
        with journal.locked():
            batch = journal.batch()
            current = journal.view.bucket_rows([bucket]).get(bucket, logic.NO_BUCKET)[1]
            end, note = logic.pause(current, bucket, until, reason, batch.at)
            if end != current:
                batch.add(Paused(batch.origin(), bucket, end, reason))
            if note is not None:
                batch.add(Noted(batch.origin(), actor, note.action, note.reason, note.detail))
            journal.commit(batch)
        return end

    def breaker_enter(
        self, entries: list[tuple[str, str]], actor: str, probe_ttl: float
    ) -> list[BreakerStatus]:
        """See :meth:`farmhand.store.base.Store.breaker_enter`."""
        journal = self._journal
        keys = [key for key, _ in entries]
        journal.refresh()
        # the common case, every breaker closed, needs no lock
        if logic.quiet(journal.view.breaker_rows(keys)):
            return [BreakerStatus() for _ in entries]
        with journal.locked():
            batch = journal.batch()
            rows = journal.view.breaker_rows(keys)
            out, saves, notes = logic.breaker_enter(entries, rows, batch.at, probe_ttl)
            self._write(batch, saves, notes, actor)
        return out

    def breaker_record(
        self, results: list[BreakerResult], config: BreakerConfig, actor: str
    ) -> dict[str, BreakerStatus]:
        """See :meth:`farmhand.store.base.Store.breaker_record`."""
        journal = self._journal
        keys = [r.key for r in results]
        journal.refresh()
        if all(r.ok for r in results) and logic.quiet(
            journal.view.breaker_rows(keys), failures=True
        ):
            return {key: BreakerStatus() for key in keys}
        with journal.locked():
            batch = journal.batch()
            rows = journal.view.breaker_rows(keys)
            out, saves, notes = logic.breaker_record(results, rows, batch.at, config)
            self._write(batch, saves, notes, actor)
        return out

    def breaker_peek(self, key: str) -> BreakerStatus:
        """See :meth:`farmhand.store.base.Store.breaker_peek`."""
        self._journal.refresh()
        row = self._journal.view.breaker_rows([key]).get(key, logic.CLOSED)
        return logic.breaker_status(row, self._journal.clock.now())

    def _write(
        self,
        batch: Batch,
        saves: dict[str, logic.BreakerRow],
        notes: list[logic.AuditNote],
        actor: str,
    ) -> None:
        for key, row in saves.items():
            batch.add(BreakerSet(batch.origin(), key, row))
        for note in notes:
            batch.add(Noted(batch.origin(), actor, note.action, note.reason, note.detail))
        self._journal.commit(batch)
