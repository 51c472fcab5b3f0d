"""The operator's changes to the registry: what admin commands, the audit and the stats
flusher write (admin.py, maintenance.py, audit.py, workers.py and mount.py own no LMDB).

Owns the pause records (``meta``, ``paused:<mirror>``), the audit figures (``counters``,
``m<i>.audit_*``), and the admin-command steps on the journal, pins and copies. Each function
is one short write transaction (no await); those that go in batches (backfill, import) move
their cursor in the same transaction as the batch, so a restarted run goes on where it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import lmdb

from mirrorfs.cache import cursors
from mirrorfs.cache.db import F_ORPHAN, F_PINNED, JOB_PENDING, U64, get_counter, set_counter
from mirrorfs.cache.registry import MirrorRule, Registry

PAUSED_PREFIX = b"paused:"


# ---------------------------------------------------------------- pause


def paused_mirrors(reg: Registry) -> dict[str, dict[str, Any]]:
    """Mirrors paused by ``mirrorfs pause`` (kept in LMDB: a pause survives a remount),
    each with since when and by whom."""
    out = {}
    with reg.db.begin() as txn:
        cur = txn.cursor(db=reg.db.db["meta"])
        if cur.set_range(PAUSED_PREFIX):
            for k, v in cur:
                if not bytes(k).startswith(PAUSED_PREFIX):
                    break
                out[bytes(k)[len(PAUSED_PREFIX):].decode()] = json.loads(bytes(v))
    return out


def set_paused(reg: Registry, names: Iterable[str], record: dict[str, Any]) -> None:
    """A second pause keeps the first one's record (its time)."""
    value = json.dumps(record).encode()
    with reg.db.begin(write=True) as txn:
        for name in names:
            txn.put(PAUSED_PREFIX + name.encode(), value, db=reg.db.db["meta"],
                    overwrite=False)


def clear_paused(reg: Registry, names: Iterable[str]) -> None:
    with reg.db.begin(write=True) as txn:
        for name in names:
            txn.delete(PAUSED_PREFIX + name.encode(), db=reg.db.db["meta"])


# ---------------------------------------------------------------- journal


def retry_failed(reg: Registry, mirrors: Iterable[int], now: float) -> int:
    """Failed jobs of ``mirrors`` are pending again, due ``now``."""
    n = 0
    with reg.db.begin(write=True) as txn:
        for idx in mirrors:
            n += reg.journal.retry_failed(txn, idx, now)
    return n


def held_deletes(reg: Registry, txn: lmdb.Transaction, mirror: int, now: float) -> set[int]:
    """Inodes whose delete on ``mirror`` waits out ``delete_policy = "delayed"``: the undo
    window, which `drain` and `umount --wait` keep unless told otherwise."""
    rule = next((r for r in reg.mirrors if r.index == mirror), None)
    if rule is None or rule.delete_policy != "delayed":
        return set()
    out = set()
    for ino, job in reg.journal.iter_jobs(txn, mirror):
        if job.state != JOB_PENDING or job.due <= now:
            continue
        node = reg.get_txn(txn, ino)
        if node is None or node.flags & F_ORPHAN:
            out.add(ino)
    return out


def expedite(reg: Registry, inos: list[int] | None, deletes: bool, now: float) -> int:
    """Skip the cool-down: every pending job (or those of ``inos``) is due ``now``; with
    ``deletes`` False, not the deletes held by a delayed delete policy."""
    n = 0
    with reg.db.begin(write=True) as txn:
        for m in reg.mirrors:
            targets = inos if inos is not None else [
                ino for ino, _job in reg.journal.iter_jobs(txn, m.index)]
            held = set() if deletes else held_deletes(reg, txn, m.index, now)
            for ino in targets:
                if ino not in held:
                    n += reg.journal.expedite(txn, m.index, ino, now)
    return n


def backfill_key(name: str) -> bytes:
    return b"backfill:" + name.encode()


def backfill_step(reg: Registry, rule: MirrorRule, now: float, after: int,
                  batch: int) -> tuple[int, int]:
    """Queue up to ``batch`` files after inode ``after`` for ``rule``'s mirror and save the
    position: (queued, last inode; 0 when done)."""
    with reg.db.begin(write=True) as txn:
        queued, last = reg.touch_all(txn, rule, now, after, batch)
        cursors.set_txn(txn, reg.db, backfill_key(rule.name), U64.pack(last) if last else None)
    return queued, last


def requeue_copy(reg: Registry, mirror: int, ino: int, key: bytes) -> None:
    """The copy at ``key`` on ``mirror`` is missing or bad: forget it and upload again."""
    with reg.db.begin(write=True) as txn:
        reg.drop_remote(txn, mirror, ino, key)
        reg.requeue(txn, ino, mirror)


def set_pinned(reg: Registry, ino: int, pin: bool) -> bool:
    """False if the inode is gone."""
    with reg.db.begin(write=True) as txn:
        cur = reg.get_txn(txn, ino)
        if cur is None:
            return False
        cur.flags = cur.flags | F_PINNED if pin else cur.flags & ~F_PINNED
        txn.put(U64.pack(cur.ino), cur.pack(), db=reg.inodes)
    return True


# ---------------------------------------------------------------- import


@dataclass(frozen=True)
class Listed:
    """An object of a mirror to register: a file, or with ``folder`` a directory marker."""

    path: bytes
    key: bytes = b""
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644
    digest: bytes | None = None
    folder: bool = False


def import_page(reg: Registry, mirror: int, items: list[Listed], cursor_key: bytes,
                next_cursor: str | None) -> list[str]:
    """Register one page of a listing and move the import's cursor, in one transaction.
    One status per item: added, attached, exists, blocked (files); dirs, blocked, exists
    (folder markers)."""
    out = []
    with reg.db.begin(write=True) as txn:
        for it in items:
            if it.folder:
                status = reg.ensure_dir(txn, it.path)
                out.append("dirs" if status == "added" else status)
                continue
            status, _node = reg.add_remote_file(txn, it.path, it.size, it.mtime_ns, it.mode,
                                                it.digest, mirror, it.key)
            out.append(status)
        cursors.set_txn(txn, reg.db, cursor_key,
                        next_cursor.encode() if next_cursor is not None else None)
    return out


# ---------------------------------------------------------------- counters


def _audit_ctr(mirror: int, name: str) -> bytes:
    return b"m%d.audit_%s" % (mirror, name.encode())


def record_audit(reg: Registry, mirror: int, started: int, finished: int, checked: int,
                 counts: Mapping[str, int]) -> int:
    """The figures of an audit that finished; returns when the previous one started."""
    c = reg.counters
    with reg.db.begin(write=True) as txn:
        prev = get_counter(txn, c, _audit_ctr(mirror, "started"))
        set_counter(txn, c, _audit_ctr(mirror, "started"), started)
        set_counter(txn, c, _audit_ctr(mirror, "last"), finished)
        set_counter(txn, c, _audit_ctr(mirror, "runs"),
                    get_counter(txn, c, _audit_ctr(mirror, "runs")) + 1)
        set_counter(txn, c, _audit_ctr(mirror, "checked"), checked)
        for k, v in counts.items():
            set_counter(txn, c, _audit_ctr(mirror, k), v)
    return prev


def add_counter(reg: Registry, name: bytes, n: int) -> None:
    with reg.db.begin(write=True) as txn:
        set_counter(txn, reg.counters, name, get_counter(txn, reg.counters, name) + n)


class Deltas(Protocol):
    """In-memory counter deltas (stats.RuntimeStats)."""

    def flush(self, txn: lmdb.Transaction, db: object) -> None: ...


def fold_deltas(reg: Registry, stats: Deltas) -> None:
    """Add the hot-path counters kept in memory to LMDB."""
    with reg.db.begin(write=True) as txn:
        stats.flush(txn, reg.counters)
