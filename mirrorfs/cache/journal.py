"""Pending work per mirror: coalesce, order by due time, claim, complete, fail.

A job says "mirror M must be reconciled with inode I": the uploader compares what the mirror
holds (``remote`` db) with what the inode is now (path, content version, mode, mtime) and does
the one operation that closes the gap (upload, server-side rename, delete, metadata update).
So a job carries no payload, and any number of changes before it runs coalesce into one: ten
writes are one upload, a file created and deleted inside the cool-down costs nothing, a file
renamed inside it is uploaded once under its final name.

All functions take an open LMDB write transaction from the caller, so that the journal entry
is committed together with the metadata change that caused it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import lmdb
import trio

from mirrorfs.cache.db import (
    JOB_CLAIMED,
    JOB_FAILED,
    JOB_PENDING,
    MDQ,
    MQ,
    U16,
    Job,
    bump_counter,
)

if TYPE_CHECKING:
    from mirrorfs.cache.db import Database


def _ctr(mirror: int, name: str) -> bytes:
    return b"m%d.%s" % (mirror, name.encode())


class Signal:
    """Wakes every task waiting for the next change: an Event renewed at each :meth:`fire`.
    Firing inside a transaction is safe: a woken task runs only after the firing one
    yields, and no transaction spans a yield."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Journal:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: fired at every change of a job (new, pushed back, claimed, done, failed, put back):
        #: `drain`, `move` and the backfill throttle wait on it instead of polling the journal
        self.changed = Signal()
        self.jobs = db.db["jobs"]
        self.queue = db.db["queue"]
        self.counters = db.db["counters"]

    def get(self, txn: lmdb.Transaction, mirror: int, ino: int) -> Job | None:
        v = txn.get(MQ.pack(mirror, ino), db=self.jobs)
        return Job.unpack(v) if v else None

    def _put(self, txn: lmdb.Transaction, mirror: int, ino: int, job: Job) -> None:
        txn.put(MQ.pack(mirror, ino), job.pack(), db=self.jobs)
        self.changed.fire()

    def touch(self, txn: lmdb.Transaction, mirror: int, ino: int, due: float) -> None:
        """Record that (mirror, ino) changed; the job runs at ``due`` at the earliest.

        An existing pending job is pushed back to ``due`` (a new write restarts the cool-down);
        a claimed one gets a new seq so its worker knows to leave it pending when it finishes;
        a failed one becomes pending again (the change may have fixed it, e.g. a rename).
        """
        job = self.get(txn, mirror, ino)
        if job is None:
            job = Job(due=due, seq=1)
            txn.put(MDQ.pack(mirror, due, ino), b"", db=self.queue)
            bump_counter(txn, self.counters, _ctr(mirror, "jobs"), 1)
        elif job.state == JOB_CLAIMED:
            job.seq += 1
            job.due = max(job.due, due)
        else:
            if job.state == JOB_PENDING:
                txn.delete(MDQ.pack(mirror, job.due, ino), db=self.queue)
            else:
                bump_counter(txn, self.counters, _ctr(mirror, "failed"), -1)
                job.attempts = 0
                job.error = ""
            job.state = JOB_PENDING
            job.seq += 1
            job.due = due
            txn.put(MDQ.pack(mirror, due, ino), b"", db=self.queue)
        self._put(txn, mirror, ino, job)

    def expedite(self, txn: lmdb.Transaction, mirror: int, ino: int, now: float) -> bool:
        """Skip the rest of the cool-down of a pending job (drain, move); True if it moved."""
        job = self.get(txn, mirror, ino)
        if job is None or job.state != JOB_PENDING or job.due <= now:
            return False
        txn.delete(MDQ.pack(mirror, job.due, ino), db=self.queue)
        job.due = now
        self._put(txn, mirror, ino, job)
        txn.put(MDQ.pack(mirror, now, ino), b"", db=self.queue)
        return True

    def due(self, txn: lmdb.Transaction, mirror: int, now: float,
            limit: int) -> list[tuple[int, Job]]:
        """Up to ``limit`` pending jobs of ``mirror`` whose due time has passed, oldest first."""
        out: list[tuple[int, Job]] = []
        cur = txn.cursor(db=self.queue)
        prefix = U16.pack(mirror)
        if not cur.set_range(prefix):
            return out
        for key, _ in cur:
            if key[:2] != prefix or len(out) >= limit:
                break
            _m, due, ino = MDQ.unpack(key)
            if due > now:
                break
            job = self.get(txn, mirror, ino)
            if job is not None:
                out.append((ino, job))
        return out

    def next_due(self, txn: lmdb.Transaction, mirror: int) -> float | None:
        cur = txn.cursor(db=self.queue)
        prefix = U16.pack(mirror)
        if cur.set_range(prefix) and cur.key()[:2] == prefix:
            return MDQ.unpack(cur.key())[1]
        return None

    def claim(self, txn: lmdb.Transaction, mirror: int, ino: int) -> Job | None:
        """Take a pending job out of the queue; return it (with its seq) or None."""
        job = self.get(txn, mirror, ino)
        if job is None or job.state != JOB_PENDING:
            return None
        txn.delete(MDQ.pack(mirror, job.due, ino), db=self.queue)
        job.state = JOB_CLAIMED
        self._put(txn, mirror, ino, job)
        return job

    def complete(self, txn: lmdb.Transaction, mirror: int, ino: int, seq: int) -> bool:
        """The worker reconciled the state it saw at ``seq``. Return True if the job is gone.

        If a change came in meanwhile (seq differs) the job goes back to the queue.
        """
        job = self.get(txn, mirror, ino)
        if job is None:
            return True
        if job.seq == seq:
            self._drop(txn, mirror, ino, job)
            return True
        job.state = JOB_PENDING
        job.attempts = 0
        job.error = ""
        self._put(txn, mirror, ino, job)
        txn.put(MDQ.pack(mirror, job.due, ino), b"", db=self.queue)
        return False

    def retry_later(self, txn: lmdb.Transaction, mirror: int, ino: int, due: float,
                    error: str) -> None:
        """A transient failure: back to the queue at ``due``, with the reason kept."""
        job = self.get(txn, mirror, ino)
        if job is None:
            return
        if job.state == JOB_PENDING:
            txn.delete(MDQ.pack(mirror, job.due, ino), db=self.queue)
        elif job.state == JOB_FAILED:
            bump_counter(txn, self.counters, _ctr(mirror, "failed"), -1)
        job.state = JOB_PENDING
        job.attempts += 1
        job.error = error
        job.due = due
        self._put(txn, mirror, ino, job)
        txn.put(MDQ.pack(mirror, due, ino), b"", db=self.queue)

    def fail(self, txn: lmdb.Transaction, mirror: int, ino: int, seq: int, error: str) -> None:
        """A permanent failure: visible, not retried until `retry` or the next change."""
        job = self.get(txn, mirror, ino)
        if job is None:
            return
        if job.seq != seq:  # changed meanwhile: the change may fix it, try again
            self.complete(txn, mirror, ino, seq)
            return
        if job.state == JOB_PENDING:
            txn.delete(MDQ.pack(mirror, job.due, ino), db=self.queue)
        if job.state != JOB_FAILED:
            bump_counter(txn, self.counters, _ctr(mirror, "failed"), 1)
        job.state = JOB_FAILED
        job.attempts += 1
        job.error = error
        self._put(txn, mirror, ino, job)

    def retry_failed(self, txn: lmdb.Transaction, mirror: int, now: float) -> int:
        n = 0
        for ino, job in list(self.iter_jobs(txn, mirror)):
            if job.state == JOB_FAILED:
                self.touch(txn, mirror, ino, now)
                n += 1
        return n

    def drop(self, txn: lmdb.Transaction, mirror: int, ino: int) -> None:
        job = self.get(txn, mirror, ino)
        if job is not None:
            self._drop(txn, mirror, ino, job)

    def _drop(self, txn: lmdb.Transaction, mirror: int, ino: int, job: Job) -> None:
        if job.state == JOB_PENDING:
            txn.delete(MDQ.pack(mirror, job.due, ino), db=self.queue)
        elif job.state == JOB_FAILED:
            bump_counter(txn, self.counters, _ctr(mirror, "failed"), -1)
        txn.delete(MQ.pack(mirror, ino), db=self.jobs)
        bump_counter(txn, self.counters, _ctr(mirror, "jobs"), -1)
        self.changed.fire()

    def iter_jobs(self, txn: lmdb.Transaction, mirror: int) -> Iterator[tuple[int, Job]]:
        cur = txn.cursor(db=self.jobs)
        prefix = U16.pack(mirror)
        if not cur.set_range(prefix):
            return
        for key, val in cur:
            if key[:2] != prefix:
                break
            yield MQ.unpack(key)[1], Job.unpack(val)

    def has_jobs(self, txn: lmdb.Transaction, mirrors: list[int], ino: int) -> bool:
        return any(txn.get(MQ.pack(m, ino), db=self.jobs) is not None for m in mirrors)

    def release_claims(self, txn: lmdb.Transaction, mirror: int, now: float) -> int:
        """At startup no worker is alive: every claimed job's lease has ended."""
        n = 0
        for ino, job in list(self.iter_jobs(txn, mirror)):
            if job.state == JOB_CLAIMED:
                job.state = JOB_PENDING
                job.due = min(job.due, now)
                self._put(txn, mirror, ino, job)
                txn.put(MDQ.pack(mirror, job.due, ino), b"", db=self.queue)
                n += 1
        return n
