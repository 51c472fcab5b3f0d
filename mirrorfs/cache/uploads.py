"""The uploader's records: every LMDB read and write of a mirror job, one transaction each.

Owns no database of its own; it is the one place where the uploader (mirrorfs/uploader.py)
touches the registry's ``jobs``/``queue`` (claim, complete, retry, fail), ``remote``/``rpath``
(what each mirror holds), ``pending`` (unfinished multi-step operations, see cache/db.py), the
whole-file and chunk hashes the upload computed (``inodes``, ``chunks``), the per-mirror
counters and, for multi-node mirrors, the change ``outbox``. Each function below is one named
step of a job and runs in one short synchronous transaction (the uploader never holds one
across an await): the order of these steps around the remote calls is what the crash table
of docs/ARCHITECTURE.md relies on, so the uploader calls them, never ``txn.put`` itself.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb

from mirrorfs.cache.db import (
    F_ORPHAN,
    LOCAL_FULL,
    MQ,
    PEND_DELETE,
    PEND_RENAME,
    PEND_UPLOAD,
    U64,
    Inode,
    RemoteCopy,
    bump_counter,
    set_counter,
)
from mirrorfs.cache.sync import emit

if TYPE_CHECKING:
    from mirrorfs.cache.registry import MirrorRule, Registry

#: a pending record: (key, kind, hash) as cache/registry.py's ``pending_ops`` returns them
Pending = tuple[bytes, bytes, bytes]


def _ctr(mirror: int, name: str) -> bytes:
    return b"m%d.%s" % (mirror, name.encode())


def _emit(txn: lmdb.Transaction, reg: Registry, mirror: int, rec: dict[str, Any]) -> None:
    """A change record in the outbox of a multi-node mirror (published by mirrorfs/pull.py);
    in the transaction that records the change itself."""
    emit(txn, reg.db, mirror, rec)


def _change(op: str, path: bytes, **fields: object) -> dict[str, Any]:
    return {"op": op, "path": os.fsdecode(path), **fields}


def wanted_paths(txn: lmdb.Transaction, reg: Registry, rule: MirrorRule,
                 node: Inode | None) -> list[bytes]:
    """The keys the mirror should hold for ``node``: one per path (hard link) it wants."""
    if node is None or node.flags & F_ORPHAN or not stat.S_ISREG(node.mode):
        return []
    return [p for p in reg.paths_txn(txn, node) if rule.wants(p)]


# ------------------------------------------------------------------ the job queue

def release_claims(reg: Registry, mirror: int, now: float) -> int:
    """No worker of ``mirror`` is alive (a restarted scheduler): claimed jobs are pending."""
    with reg.db.begin(write=True) as txn:
        return reg.journal.release_claims(txn, mirror, now)


def claim_due(reg: Registry, mirror: int, now: float, limit: int) -> list[tuple[int, int]]:
    """Claim up to ``limit`` due jobs of ``mirror``: [(ino, seq)] in due order."""
    out: list[tuple[int, int]] = []
    with reg.db.begin(write=True) as txn:
        for ino, _job in reg.journal.due(txn, mirror, now, limit):
            claimed = reg.journal.claim(txn, mirror, ino)
            if claimed is not None:
                out.append((ino, claimed.seq))
    return out


def next_due(reg: Registry, mirror: int) -> float | None:
    with reg.db.begin() as txn:
        return reg.journal.next_due(txn, mirror)


def expedite_all(reg: Registry, mirror: int, now: float) -> None:
    """Every pending job of ``mirror`` is due now (the mirror came back: no backoff left)."""
    with reg.db.begin(write=True) as txn:
        for ino, _job in list(reg.journal.iter_jobs(txn, mirror)):
            reg.journal.expedite(txn, mirror, ino, now)


def retry_job(reg: Registry, mirror: int, ino: int, now: float, reason: str,
              delay_for: Callable[[int], float]) -> float:
    """A failed attempt: back to the queue after ``delay_for(attempts so far)``; the delay."""
    with reg.db.begin(write=True) as txn:
        job = reg.journal.get(txn, mirror, ino)
        delay = delay_for(job.attempts if job else 0)
        reg.journal.retry_later(txn, mirror, ino, now + delay, reason)
    return delay


def defer_job(reg: Registry, mirror: int, ino: int, due: float, reason: str) -> None:
    """The job cannot run yet (a key busy, a file being written): requeue at ``due``; a
    deferral is not a failed attempt (the attempt count, which sets the backoff, stays)."""
    with reg.db.begin(write=True) as txn:
        job = reg.journal.get(txn, mirror, ino)
        attempts = job.attempts if job else 0
        reg.journal.retry_later(txn, mirror, ino, due, reason)
        job = reg.journal.get(txn, mirror, ino)
        if job is not None:
            job.attempts = attempts
            txn.put(MQ.pack(mirror, ino), job.pack(), db=reg.journal.jobs)


def fail_job(reg: Registry, mirror: int, ino: int, seq: int, reason: str) -> None:
    """A permanent failure: shown by `status`, not retried until the next change."""
    with reg.db.begin(write=True) as txn:
        reg.journal.fail(txn, mirror, ino, seq, reason)


def complete_jobs(reg: Registry, mirror: int, done: list[tuple[int, int]], now: float) -> None:
    """The mirror holds what each inode was at ``seq``: drop the jobs (a job touched since
    goes back to the queue) and settle the dirty counters, all in one transaction."""
    with reg.db.begin(write=True) as txn:
        for ino, seq in done:
            reg.job_done(txn, mirror, ino, seq)
        set_counter(txn, reg.counters, _ctr(mirror, "last_success"), int(now))


# ------------------------------------------------------------------ what a job sees

@dataclass
class JobView:
    """One consistent read of what a job reconciles: the inode now, the keys it wants on
    the mirror, the objects the mirror holds for it, and unfinished steps of earlier runs."""

    node: Inode | None
    wanted: list[bytes]
    copies: list[RemoteCopy]
    pending: list[Pending]


def job_view(reg: Registry, rule: MirrorRule, ino: int) -> JobView:
    with reg.db.begin() as txn:
        node = reg.get_txn(txn, ino)
        return JobView(node, wanted_paths(txn, reg, rule, node),
                       reg.remote_copies(txn, rule.index, ino),
                       reg.pending_ops(txn, rule.index, ino))


def copies(reg: Registry, mirror: int, ino: int) -> list[RemoteCopy]:
    """Every object ``mirror`` holds for ``ino`` (one per key)."""
    with reg.db.begin() as txn:
        return reg.remote_copies(txn, mirror, ino)


def owner_and_copies(reg: Registry, mirror: int, ino: int,
                     key: bytes) -> tuple[int | None, list[RemoteCopy]]:
    """Which inode owns ``key`` on the mirror, and what the mirror holds for ``ino``."""
    with reg.db.begin() as txn:
        return reg.rpath_owner(txn, mirror, key), reg.remote_copies(txn, mirror, ino)


def owner(reg: Registry, mirror: int, key: bytes) -> int | None:
    with reg.db.begin() as txn:
        return reg.rpath_owner(txn, mirror, key)


def source_changed(reg: Registry, rule: MirrorRule, node: Inode, key: bytes) -> bool:
    """Whether ``node`` changed since the job read it so that its content at ``key`` is no
    longer wanted: unlinked, another version, or no longer wanting that key. Then a content
    file that vanished under the upload is no error (the job runs again on the new state)."""
    with reg.db.begin() as txn:
        cur = reg.get_txn(txn, node.ino)
        return (cur is None or cur.ver != node.ver or cur.local != LOCAL_FULL
                or key not in wanted_paths(txn, reg, rule, cur))


# ------------------------------------------------------------------ taking over a key

def take_over_key(reg: Registry, rule: MirrorRule, ino: int, key: bytes, other_ino: int,
                  now: float) -> tuple[str, float] | None:
    """``key`` holds inode ``other_ino``'s object; ``ino`` wants to write there. Drop the
    other's record of it if nothing is lost by overwriting (returns None), else say why not
    and when to look again (``(reason, delay)``; the other inode's job may be queued now)."""
    idx = rule.index
    with reg.db.begin(write=True) as txn:
        other = reg.get_txn(txn, other_ino)
        other_want = wanted_paths(txn, reg, rule, other)
        if other is not None and key in other_want:
            return f"key {key!r} still belongs to inode {other_ino}", 1.0
        if other is not None and other.local != LOCAL_FULL and reg.is_open(other_ino):
            return f"key {key!r} holds inode {other_ino}, still open for reading", 1.0
        # (or its content is on this mirror at another key it wants: a hard link)
        elsewhere = other is not None and any(
            c.ver == other.ver and c.path in other_want
            for c in reg.remote_copies(txn, idx, other_ino))
        recoverable = (other is None or other.flags & F_ORPHAN or not other_want
                       or other.local == LOCAL_FULL or elsewhere)
        if not recoverable:
            # The other inode's only copy here is this object: let it move away first.
            reg.journal.touch(txn, idx, other_ino, now)
            return f"key {key!r} holds inode {other_ino}, which must move first", 0.5
        reg.drop_remote(txn, idx, other_ino, key)
        if other is not None and other_want:
            reg.journal.touch(txn, idx, other_ino, now)
    return None


# ------------------------------------------------------------------ multi-step operations

def start_rename(reg: Registry, mirror: int, ino: int, key: bytes, digest: bytes) -> None:
    """Before a server-side rename to ``key``: its ``pending`` record (see cache/db.py)."""
    with reg.db.begin(write=True) as txn:
        reg.set_pending(txn, mirror, ino, key, PEND_RENAME, digest)


def start_upload(reg: Registry, mirror: int, ino: int, key: bytes,
                 only_if_not_owned: bool = False) -> None:
    """Before an upload (or a server-side copy) to ``key``: its ``pending`` record, so that
    a crash cannot leave an object at a key nobody owns. ``only_if_not_owned``: a copy to a
    key the inode already owns needs none (its ``remote`` record covers it)."""
    with reg.db.begin(write=True) as txn:
        if only_if_not_owned and reg.rpath_owner(txn, mirror, key) == ino:
            return
        reg.set_pending(txn, mirror, ino, key, PEND_UPLOAD)


@dataclass
class Uploaded:
    """What a finished PUT sent (``xxhash`` hex of the bytes sent)."""

    key: bytes
    size: int
    xxhash: str
    chunks: bytes  # the chunk digests of the content the job hashed
    node: Inode  # the inode as the job read it before the upload
    prev: RemoteCopy | None  # what the mirror held at ``key`` before


def record_upload(reg: Registry, mirror: int, up: Uploaded, changed: bool,
                  publish: bool) -> None:
    """After a PUT of version ``up.node.ver`` under ``up.key``: the mirror holds it (with
    version 0 if the file changed meanwhile: the job uploads again), the pending record goes,
    and the inode keeps the hashes computed on the way (if still that version)."""
    node, ino, key = up.node, up.node.ino, up.key
    with reg.db.begin(write=True) as txn:
        cur = reg.get_txn(txn, ino)
        same = not changed and cur is not None and cur.ver == node.ver and cur.size == up.size
        reg.set_remote(txn, mirror, ino, RemoteCopy(key, node.ver if same else 0,
                                                    bytes.fromhex(up.xxhash), up.size,
                                                    node.mode, node.mtime_ns))
        reg.clear_pending(txn, mirror, ino, key)
        bump_counter(txn, reg.counters, _ctr(mirror, "uploads"), 1)
        bump_counter(txn, reg.counters, _ctr(mirror, "upload_bytes"), up.size)
        if not same or cur is None:
            return
        cur.hash = bytes.fromhex(up.xxhash)
        cur.hash_ver = cur.ver
        txn.put(U64.pack(ino), cur.pack(), db=reg.inodes)
        txn.put(U64.pack(ino), U64.pack(cur.ver) + up.chunks, db=reg.chunks)
        if publish:
            old = up.prev
            prev = old.hash.hex() if (old is not None and old.path == key
                                      and old.hash.strip(b"\0")) else None
            _emit(txn, reg, mirror, _change(
                "put", key, hash=up.xxhash, prev=prev, size=up.size, mtime=node.mtime_ns,
                mode=node.mode & 0o7777, chunks=up.chunks.hex()))


def record_move(reg: Registry, mirror: int, ino: int, rc: RemoteCopy, new_key: bytes,
                publish: bool) -> None:
    """A server-side rename of ``rc`` to ``new_key`` is done: the object moved."""
    with reg.db.begin(write=True) as txn:
        reg.set_remote(txn, mirror, ino, RemoteCopy(new_key, rc.ver, rc.hash, rc.size,
                                                    rc.mode, rc.mtime_ns))
        reg.drop_remote(txn, mirror, ino, rc.path)
        reg.clear_pending(txn, mirror, ino, new_key)
        bump_counter(txn, reg.counters, _ctr(mirror, "renames"), 1)
        if publish:
            _emit(txn, reg, mirror, _change(
                "rename", new_key, **{"from": os.fsdecode(rc.path)}, hash=rc.hash.hex(),
                size=rc.size, mtime=rc.mtime_ns, mode=rc.mode & 0o7777))


def record_copy(reg: Registry, mirror: int, ino: int, src: RemoteCopy, key: bytes,
                old: RemoteCopy | None, publish: bool) -> None:
    """A server-side copy of another path of the inode (a hard link) landed at ``key``."""
    with reg.db.begin(write=True) as txn:
        reg.set_remote(txn, mirror, ino, RemoteCopy(key, src.ver, src.hash, src.size,
                                                    src.mode, src.mtime_ns))
        reg.clear_pending(txn, mirror, ino, key)
        bump_counter(txn, reg.counters, _ctr(mirror, "server_copies"), 1)
        if not publish:
            return
        chunks = txn.get(U64.pack(ino), db=reg.chunks)
        node = reg.get_txn(txn, ino)
        prev = old.hash.hex() if old is not None and old.hash.strip(b"\0") else None
        fields: dict[str, object] = {}
        if chunks is not None and node is not None and \
                U64.unpack(bytes(chunks[:8]))[0] == src.ver:
            fields["chunks"] = bytes(chunks[8:]).hex()
        _emit(txn, reg, mirror, _change(
            "put", key, hash=src.hash.hex(), prev=prev, size=src.size, mtime=src.mtime_ns,
            mode=src.mode & 0o7777, **fields))


def record_meta(reg: Registry, mirror: int, node: Inode, key: bytes, publish: bool) -> None:
    """The object at ``key`` got ``node``'s mode and mtime (a metadata-only update)."""
    with reg.db.begin(write=True) as txn:
        rc = reg.remote_copy(txn, mirror, node.ino, key)
        if rc is None:
            return
        rc.mode, rc.mtime_ns = node.mode, node.mtime_ns
        reg.set_remote(txn, mirror, node.ino, rc)
        if publish:
            _emit(txn, reg, mirror, _change(
                "put", rc.path, hash=rc.hash.hex(), prev=rc.hash.hex(), size=rc.size,
                mtime=rc.mtime_ns, mode=rc.mode & 0o7777))


def record_delete(reg: Registry, mirror: int, ino: int, rc: RemoteCopy, deleted: bool,
                  publish: bool) -> None:
    """The object at ``rc.path`` is no longer the inode's (``deleted``: we removed it)."""
    with reg.db.begin(write=True) as txn:
        if deleted:
            bump_counter(txn, reg.counters, _ctr(mirror, "deletes"), 1)
            if publish:
                _emit(txn, reg, mirror, _change("delete", rc.path, hash=rc.hash.hex()))
        reg.drop_remote(txn, mirror, ino, rc.path)


# ------------------------------------------------------------------ settling pending records

@dataclass
class PendingView:
    """What settling one pending record needs: who owns the key now, and (for a cut rename)
    the inode's copies of that content at other keys."""

    owner: int | None
    sources: list[RemoteCopy]


def pending_view(reg: Registry, mirror: int, ino: int, key: bytes,
                 digest: bytes) -> PendingView:
    with reg.db.begin() as txn:
        return PendingView(reg.rpath_owner(txn, mirror, key),
                           [c for c in reg.remote_copies(txn, mirror, ino)
                            if c.path != key and c.hash == digest])


def settle_pending(reg: Registry, mirror: int, ino: int, key: bytes, kind: bytes,
                   digest: bytes, carried_out: bool, publish: bool) -> None:
    """The pending record of ``key`` is resolved (``carried_out``: its object was deleted
    by this run or nothing of ours was there, as opposed to: owned, nothing to do)."""
    with reg.db.begin(write=True) as txn:
        if carried_out and kind == PEND_DELETE:
            bump_counter(txn, reg.counters, _ctr(mirror, "deletes"), 1)
            if publish:
                _emit(txn, reg, mirror, _change("delete", key, hash=digest.hex()))
        reg.clear_pending(txn, mirror, ino, key)
