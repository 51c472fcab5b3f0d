"""The background workers that bring every mirror in line with the registry.

Owns the per-mirror runtime state (up/down, paused, jobs in flight, busy paths). One
scheduler task per mirror takes due jobs from the journal and runs each in a task of its own,
at most ``concurrency`` transfers at a time (plus ``Remote.jobs_ahead`` jobs doing their local
work meanwhile, where the remote bounds its own requests); a mirror that is down or paused
only stops its own queue.

A job is a reconciliation, not a recorded operation: it reads what the inode is now (the
set of its paths the mirror wants: one, or one per hard link) and what the mirror holds
(``remote`` db: a set of keys) and performs, per wanted key, the one step that closes the
gap, then deletes the keys no longer wanted:

=========================================  ============================================
inode now (per wanted path)                step on the mirror
=========================================  ============================================
gone, unlinked, or no longer wanted here   delete the object(s) (per delete policy)
same content at a key no longer wanted     server-side rename
same content at another wanted key (link)  server-side copy where the mirror has one
other content (or nothing there yet)       upload from the cache file
same content and path, other mode/mtime    metadata update
=========================================  ============================================

Ordering (invariant 4). Objects are keyed by path, so two inodes can want the same key
(a file replaced, then recreated, or renamed over). ``rpath`` records which inode owns each
key on each mirror, and a job takes the keys it touches as *busy* before its first await: no
two jobs on one mirror touch one key at once. A job that wants a key owned by another inode
may overwrite it only if that inode is deleted, unwanted, or still has its content locally
(it is then re-uploaded under its own path); otherwise it waits for that inode's job to move
the object away first. Uploads write the new object before deleting the old one.

Multi-step operations leave no object owned by nothing (``pending`` db, see cache/db.py): an
upload or server-side copy to a key the inode does not own and a server-side rename are
recorded before they start; a key the file no longer wants stays recorded (owned) until its
delete is done. While an
inode has such a record its job stays, and every run of the job first finishes them
(:meth:`Uploader._settle_pending`): after a crash, a failed delete or a cut rename.

Concurrency contract: the uploader's LMDB access (claims, completions, remote copies, the
outbox) is the named operations of cache/uploads.py, each one short synchronous transaction
in the trio thread, never across an await; remotes do their blocking work in threads of their
own; hashing runs in a thread under ``hash_limiter``. A job runs under a lease (a deadline); a
job whose lease ends is cancelled and requeued, and at startup every claimed job is pending
again (see cache/recover.py).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
import xxhash

from mirrorfs.busy import BusyKeys
from mirrorfs.cache import uploads
from mirrorfs.cache.db import (
    LOCAL_FULL,
    PEND_DELETE,
    PEND_RENAME,
    PEND_UPLOAD,
    Inode,
    RemoteCopy,
)
from mirrorfs.cache.registry import MirrorRule, Registry
from mirrorfs.errors import (
    InvalidKey,
    MirrorfsError,
    NotFound,
    PermanentRemoteError,
    RemoteError,
    RemoteUnavailable,
)
from mirrorfs.hashing import read_and_hash
from mirrorfs.remotes.base import ObjectMeta, Remote
from mirrorfs.seams import crash_point

if TYPE_CHECKING:
    from mirrorfs.cache.store import Store
    from mirrorfs.fs import Operations
    from mirrorfs.workers import Supervisor

log = logging.getLogger(__name__)

PROBE_INTERVAL = 5.0
#: Content files up to this size are read and hashed in the trio thread, like a pread of a
#: handler (~10 us for 64 KiB with xxh3): a hop to a worker thread and back costs more.
INLINE_READ = 64 * 1024
MAX_BACKOFF = 300.0


def backoff(attempts: int) -> float:
    """Seconds before the next attempt: exponential from 1 s, capped, with jitter."""
    return min(MAX_BACKOFF, 2.0 ** min(attempts, 16)) * random.uniform(0.5, 1.0)


def lease_for(size: int) -> float:
    """How long one job may run before it is cancelled and requeued (a stuck transfer)."""
    return 120.0 + size / (512 * 1024)


def remote_key(path: bytes) -> str:
    return os.fsdecode(path)


class Defer(Exception):
    """The job cannot run yet (a key it needs is busy or owned); requeue without penalty."""

    def __init__(self, reason: str, delay: float = 0.2) -> None:
        super().__init__(reason)
        self.delay = delay


@dataclass
class MirrorState:
    rule: MirrorRule
    remote: Remote
    concurrency: int
    paused: bool = False
    publish: bool = False  # multi-node: record finished changes for the change log
    up: bool = True
    last_error: str = ""
    in_flight: set[int] = field(default_factory=set)
    busy: BusyKeys = field(default_factory=BusyKeys)
    wake: trio.Event = field(default_factory=trio.Event)


class Uploader:
    def __init__(self, reg: Registry, store: Store, ops: Operations | None,
                 mirrors: list[MirrorState], clock: Callable[[], float] = time.time,
                 on_done: Callable[[int], None] = lambda ino: None) -> None:
        self.reg = reg
        self.store = store
        self.ops = ops
        self.mirrors = {m.rule.index: m for m in mirrors}
        self.clock = clock
        self.hash_limiter = trio.CapacityLimiter(2)
        self.draining = False
        #: our mark in the metadata of every object we write (ObjectMeta.writer)
        self.writer = reg.db.registry_id
        self.on_done = on_done
        self._nursery: trio.Nursery | None = None
        self._scheduled: set[int] = set()  # mirrors whose scheduler ran (see _schedule)
        if ops is not None:
            ops.on_commit = lambda node: self.kick()

    @classmethod
    async def create(cls, reg: Registry, store: Store, ops: Operations | None,
                     mirrors: list[MirrorState], nursery: trio.Nursery,
                     supervisor: Supervisor | None = None,
                     on_done: Callable[[int], None] = lambda ino: None) -> Uploader:
        self = cls(reg, store, ops, mirrors, on_done=on_done)
        self._nursery = nursery
        for m in self.mirrors.values():
            if supervisor is not None:  # restarted if it fails (see workers.Supervisor)
                supervisor.start_soon(f"uploader:{m.rule.name}", self._schedule, m)
            else:
                nursery.start_soon(self._schedule, m, name=f"uploader:{m.rule.name}")
        return self

    # ------------------------------------------------------------ control

    def kick(self) -> None:
        for m in self.mirrors.values():
            m.wake.set()

    def by_name(self, name: str | None) -> list[MirrorState]:
        if name is None:
            return list(self.mirrors.values())
        found = [m for m in self.mirrors.values() if m.rule.name == name]
        if not found:
            raise KeyError(name)
        return found

    def pause(self, name: str | None = None) -> None:
        for m in self.by_name(name):
            m.paused = True

    def resume(self, name: str | None = None) -> None:
        for m in self.by_name(name):
            m.paused = False
            m.wake.set()

    async def finish_inflight(self, timeout: float) -> None:
        """Start nothing new; give transfers in flight up to ``timeout`` to finish."""
        self.draining = True
        with trio.move_on_after(timeout):
            for m in self.mirrors.values():
                while m.in_flight:
                    await trio.sleep(0.05)

    # ------------------------------------------------------------ scheduling

    async def _schedule(self, m: MirrorState) -> None:
        # A restart after a failure (workers.Supervisor): the jobs the failed run had in
        # flight were cancelled and are still claimed; they are pending again.
        if m.rule.index in self._scheduled:
            uploads.release_claims(self.reg, m.rule.index, self.clock())
        self._scheduled.add(m.rule.index)
        async with trio.open_nursery() as jobs:
            while True:
                m.wake = trio.Event()
                delay = 1.0
                if m.paused or self.draining:
                    delay = 5.0
                elif not m.up:
                    delay = await self._probe(m)
                else:
                    started = self._start_due(m, jobs)
                    if started:
                        continue
                    nxt = uploads.next_due(self.reg, m.rule.index)
                    if nxt is not None:
                        delay = min(delay, max(0.01, nxt - self.clock()))
                with trio.move_on_after(delay):
                    await m.wake.wait()

    def _start_due(self, m: MirrorState, nursery: trio.Nursery) -> int:
        room = m.concurrency + m.remote.jobs_ahead - len(m.in_flight)
        if room <= 0:
            return 0
        claimed = uploads.claim_due(self.reg, m.rule.index, self.clock(), room)
        for ino, seq in claimed:
            m.in_flight.add(ino)
            nursery.start_soon(self._run, m, ino, seq)
        return len(claimed)

    async def _probe(self, m: MirrorState) -> float:
        try:
            with trio.fail_after(30):
                await m.remote.probe()
        except (MirrorfsError, trio.TooSlowError) as exc:
            m.last_error = str(exc) or type(exc).__name__
            return PROBE_INTERVAL
        log.info("mirror %s is reachable again; resuming its queue", m.rule.name)
        m.up = True
        # Jobs that backed off while the mirror was away should not wait out their backoff.
        uploads.expedite_all(self.reg, m.rule.index, self.clock())
        return 0.0

    async def _run(self, m: MirrorState, ino: int, seq: int) -> None:
        """One job; whatever goes wrong in it, the mount stays up."""
        try:
            await self._run_job(m, ino, seq)
        except Exception as exc:
            # A bug, or a local failure such as a registry commit on a full disk: log it and
            # try again later (if even that cannot be recorded, the job stays claimed and the
            # next start makes it pending).
            log.exception("mirror %s: job for inode %d failed unexpectedly", m.rule.name, ino)
            m.last_error = f"internal error: {exc}"
            try:
                uploads.retry_job(self.reg, m.rule.index, ino, self.clock(), str(exc),
                                  lambda _attempts: MAX_BACKOFF / 10)
            except Exception:
                log.exception("mirror %s: could not requeue inode %d", m.rule.name, ino)

    async def _run_job(self, m: MirrorState, ino: int, seq: int) -> None:
        idx = m.rule.index
        view = uploads.job_view(self.reg, m.rule, ino)
        node = view.node
        # (a file with hard links may need an upload per path)
        lease = lease_for(node.size if node else 0) * max(1, node.nlink if node else 1)
        try:
            with trio.fail_after(lease):
                await self._reconcile(m, ino, view)
        except Defer as d:
            uploads.defer_job(self.reg, idx, ino, self.clock() + d.delay, str(d))
        except InvalidKey as exc:
            log.warning("mirror %s cannot store %r: %s (marked failed)", m.rule.name,
                        self.reg.path_of(ino), exc)
            uploads.fail_job(self.reg, idx, ino, seq, f"invalid name: {exc}")
        except PermanentRemoteError as exc:
            log.error("mirror %s: %s (inode %d marked failed)", m.rule.name, exc, ino)
            uploads.fail_job(self.reg, idx, ino, seq, str(exc))
        except (MirrorfsError, trio.TooSlowError, OSError) as exc:
            # RemoteError, NotFound, and what fetching the content for another mirror met:
            # NoGoodCopy, LocalDiskError (each says whose problem it is)
            if isinstance(exc, RemoteUnavailable) and m.up:
                log.warning("mirror %s is unreachable (%s); its queue waits", m.rule.name, exc)
                m.up = False
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, trio.TooSlowError):
                reason = f"lease of {lease:.0f}s ended"
            m.last_error = reason
            delay = uploads.retry_job(self.reg, idx, ino, self.clock(), reason, backoff)
            log.info("mirror %s: inode %d: %s; retry in %.1fs", m.rule.name, ino, reason, delay)
        except BaseException:
            # Cancelled (shutdown) or a bug: leave the job claimed; startup makes it pending.
            m.in_flight.discard(ino)
            raise
        else:
            uploads.complete_jobs(self.reg, idx, [(ino, seq)], self.clock())
            self.on_done(ino)
        finally:
            m.in_flight.discard(ino)
            for k in [k for k, v in m.busy.items() if v == ino]:
                del m.busy[k]
            m.wake.set()

    # ------------------------------------------------------------ reconciliation

    def _take_keys(self, m: MirrorState, ino: int, *paths: bytes | None) -> None:
        for p in paths:
            if p is not None and m.busy.get(p, ino) != ino:
                raise Defer(f"key {p!r} busy with inode {m.busy[p]}")
        for p in paths:
            if p is not None:
                m.busy[p] = ino

    async def _reconcile(self, m: MirrorState, ino: int, view: uploads.JobView) -> None:
        """Bring the mirror's set of keys for ``ino`` in line with the inode's paths: each
        wanted key gets the current content (rename, server-side copy or upload), then the
        keys no longer wanted are deleted -- new objects before old ones go, so a crash in
        between leaves an extra object (still recorded, deleted by the next run), never a
        missing one. ``view``: the job's state read when it started."""
        node, wanted, copies = view.node, view.wanted, view.copies
        if view.pending:
            await self._settle_pending(m, ino, wanted, view.pending)
            copies = uploads.copies(self.reg, m.rule.index, ino)
        if not wanted:
            if copies:
                if node is not None and node.local != LOCAL_FULL and self.reg.is_open(ino):
                    # Unlinked while a reader streams it: the object is its only copy.
                    raise Defer("remote-only file still open for reading", 1.0)
                for rc in copies:
                    self._take_keys(m, ino, rc.path)
                    await self._delete(m, ino, rc)
            return
        assert node is not None
        for want in wanted:
            m.remote.check_key(remote_key(want))
        for want in wanted:
            await self._reconcile_key(m, node, want, wanted)
        unwanted = [rc for rc in uploads.copies(self.reg, m.rule.index, ino)
                    if rc.path not in wanted]
        if unwanted:
            crash_point("upload-recorded")
        for rc in unwanted:
            self._take_keys(m, ino, rc.path)
            await self._delete(m, ino, rc)

    async def _reconcile_key(self, m: MirrorState, node: Inode, want: bytes,
                             wanted: list[bytes]) -> None:
        """One wanted key of ``node``: the one step that gives it the current content."""
        ino = node.ino
        owner, held = uploads.owner_and_copies(self.reg, m.rule.index, ino, want)
        copies = {rc.path: rc for rc in held}
        if owner is not None and owner != ino:
            self._take_keys(m, ino, want)
            self._claim_key(m, ino, want, owner)
        self._take_keys(m, ino, want)
        rc = copies.get(want)
        current = [c for c in copies.values() if c.ver and c.ver == node.ver]
        if rc is not None and rc in current:
            await self._update_meta(m, node, rc)
            return
        # The current content at a key no longer wanted (the path was renamed): move it.
        moved = next((c for c in current if c.path not in wanted), None)
        if moved is not None:
            self._take_keys(m, ino, moved.path)
            uploads.start_rename(self.reg, m.rule.index, ino, want, moved.hash)
            try:
                await m.remote.rename(remote_key(moved.path), remote_key(want), size=moved.size)
                crash_point("rename-done")
            except NotFound:
                # A crash after the mirror renamed and before the move was recorded:
                # the old key is gone. Adopt the object at the new key if it is ours
                # (read back and hashed), else upload again if we can.
                if not await self._holds_copy(m, want, moved):
                    if node.local != LOCAL_FULL:
                        raise
                    await self._upload(m, node, want, rc)
                    return
            self._record_move(m, ino, moved, want)
            await self._update_meta(m, node, moved)
            return
        # Another path of the same inode (a hard link) is there: copy it on the server.
        source = next((c for c in current if c.path != want), None)
        if source is not None and m.remote.server_copy:
            self._take_keys(m, ino, source.path)
            uploads.start_upload(self.reg, m.rule.index, ino, want, only_if_not_owned=True)
            try:
                await m.remote.copy(remote_key(source.path), remote_key(want), size=source.size)
                crash_point("copy-done")
            except NotFound:
                pass  # the source went meanwhile: upload instead
            else:
                self._record_copy(m, ino, source, want, rc)
                await self._update_meta(m, node, source)
                return
        await self._upload(m, node, want, rc)

    async def _update_meta(self, m: MirrorState, node: Inode, rc: RemoteCopy) -> None:
        """chmod/utime since the upload: the object's metadata, not its content."""
        if rc.mode == node.mode and rc.mtime_ns == node.mtime_ns:
            return
        for c in uploads.copies(self.reg, m.rule.index, node.ino):
            if c.ver == rc.ver and (c.mode != node.mode or c.mtime_ns != node.mtime_ns):
                await m.remote.update_meta(remote_key(c.path), ObjectMeta(
                    node.size, c.hash.hex(), node.mtime_ns, node.mode & 0o7777,
                    writer=self.writer))
                self._record_meta(m, node.ino, node, c.path)

    async def _settle_pending(self, m: MirrorState, ino: int, wanted: list[bytes],
                              pending: list[tuple[bytes, bytes, bytes]]) -> None:
        """Finish what an earlier run of this job left half done (cut by a crash, a failed
        delete, a cancelled lease): every ``pending`` record is resolved before the job does
        anything else, so that each key on the mirror is either owned or deleted."""
        idx = m.rule.index
        keys = [key for key, _kind, _h in pending if key not in wanted]
        self._take_keys(m, ino, *keys)
        for key, kind, digest in pending:
            if key in wanted and kind != PEND_DELETE:
                continue  # this run uploads, copies or renames to it again and records it
            # (sources: a cut rename's source, our copy of that content at another key)
            pv = uploads.pending_view(self.reg, idx, ino, key, digest)
            if pv.owner is not None or key in wanted:
                # owned (by us: it is our recorded copy; by another inode: its object),
                # or wanted again: nothing of ours to remove
                uploads.settle_pending(self.reg, idx, ino, key, kind, digest, False,
                                       m.publish)
                continue
            if kind == PEND_RENAME and pv.sources:
                if await self._adopt_renamed(m, ino, pv.sources[0], key):
                    continue
            if m.rule.delete_policy != "never" or kind == PEND_RENAME:
                log.info("mirror %s: removing %r left by an unfinished %s", m.rule.name, key,
                         {PEND_DELETE: "move", PEND_UPLOAD: "upload",
                          PEND_RENAME: "rename"}.get(kind, "operation"))
                await m.remote.delete(remote_key(key))
            uploads.settle_pending(self.reg, idx, ino, key, kind, digest, True, m.publish)

    async def _adopt_renamed(self, m: MirrorState, ino: int, rc: RemoteCopy,
                             key: bytes) -> bool:
        """A rename to ``key`` was cut: if the source is gone and ``key`` holds our object,
        the mirror finished it; record the move. False: what is at ``key`` is a copy."""
        try:
            await m.remote.stat(remote_key(rc.path))
            return False  # the source is still there
        except NotFound:
            pass
        if not await self._holds_copy(m, key, rc):
            return False
        self._record_move(m, ino, rc, key)
        return True

    async def _holds_copy(self, m: MirrorState, path: bytes, rc: RemoteCopy) -> bool:
        """Whether the object at ``path`` has exactly the content ``rc`` records."""
        if not rc.hash.strip(b"\0"):
            return False
        h = xxhash.xxh3_128()
        size = 0
        try:
            async with m.remote.open_read(remote_key(path)) as stream:
                while data := await stream.read():
                    size += len(data)
                    await trio.to_thread.run_sync(h.update, data, limiter=self.hash_limiter)
        except NotFound:
            return False
        return size == rc.size and h.digest() == rc.hash

    def _claim_key(self, m: MirrorState, ino: int, path: bytes, owner: int) -> None:
        """``path`` holds another inode's object: overwrite it only if nothing is lost."""
        refused = uploads.take_over_key(self.reg, m.rule, ino, path, owner, self.clock())
        if refused is not None:
            raise Defer(*refused)
        m.wake.set()

    def _record_move(self, m: MirrorState, ino: int, rc: RemoteCopy, new_path: bytes) -> None:
        uploads.record_move(self.reg, m.rule.index, ino, rc, new_path, m.publish)

    def _record_copy(self, m: MirrorState, ino: int, src: RemoteCopy, path: bytes,
                     old: RemoteCopy | None) -> None:
        """A server-side copy of another path of the inode landed at ``path``."""
        uploads.record_copy(self.reg, m.rule.index, ino, src, path, old, m.publish)

    def _record_meta(self, m: MirrorState, ino: int, node: Inode, path: bytes) -> None:
        uploads.record_meta(self.reg, m.rule.index, node, path, m.publish)

    async def _delete(self, m: MirrorState, ino: int, rc: RemoteCopy) -> None:
        owner = uploads.owner(self.reg, m.rule.index, rc.path)
        deleted = owner == ino and m.rule.delete_policy != "never"
        if deleted:
            await m.remote.delete(remote_key(rc.path))
        uploads.record_delete(self.reg, m.rule.index, ino, rc, deleted, m.publish)
    def _source_gone(self, m: MirrorState, node: Inode, path: bytes) -> None:
        """The content file vanished under the upload. If the file was unlinked, replaced or
        rewritten since the job read it (the unlink removed the content file), that is no
        failure: the job runs again at once on what the file is now. Otherwise the caller's
        error stands (a content file missing for a file that still wants it)."""
        if uploads.source_changed(self.reg, m.rule, node, path):
            raise Defer("the file changed or went away before its upload", 0.0)

    async def _upload(self, m: MirrorState, node: Inode, path: bytes,
                      old: RemoteCopy | None) -> None:
        """Upload the cache file to ``path``; ``old``: what the mirror held at ``path``. A key
        the file had before (it moved) stays recorded, owned, until _reconcile deletes it."""
        ino = node.ino
        if node.local != LOCAL_FULL:
            # Content only on other mirrors (a mirror added later, or a lost copy): the read
            # path fetches it; until then this job waits.
            if self.ops is not None and self.ops.fetcher is not None:
                await self.ops.fetcher.fetch_all(node)
                raise Defer("content fetched; upload next", 0.0)
            raise RemoteError("content is not in the local cache")
        of = self.ops.open_files.get(ino) if self.ops is not None else None
        if of is not None and of.dirty:
            raise Defer("file is being written", 1.0)
        gen = of.write_gen if of is not None else 0
        src = self.store.path(ino)
        idx = m.rule.index
        t0 = trio.current_time()
        try:
            # one read for both: a small file's bytes come back with its hashes; as cheap
            # as a pread, so inline (a thread hop costs more than reading and hashing it)
            if node.size <= INLINE_READ:
                whole, chunks, size, data = read_and_hash(
                    src, min(INLINE_READ, m.remote.inline_put_limit))
            else:
                whole, chunks, size, data = await trio.to_thread.run_sync(
                    read_and_hash, src, m.remote.inline_put_limit, limiter=self.hash_limiter)
        except FileNotFoundError:
            self._source_gone(m, node, path)
            raise
        meta = ObjectMeta(size=size, xxhash=whole, mtime_ns=node.mtime_ns,
                          mode=node.mode & 0o7777, writer=self.writer)
        # say so before writing it: if the key is not ours yet, a crash must not leave
        # it owned by nothing; and a crash may leave a temp file in its directory
        uploads.start_upload(self.reg, idx, ino, path)
        t1 = trio.current_time()
        if data is not None:
            res = await m.remote.put_data(remote_key(path), data, meta)
        else:
            try:
                res = await m.remote.put(remote_key(path), src, meta)
            except FileNotFoundError:
                # (its pending record stays: the next run removes what may have been sent)
                self._source_gone(m, node, path)
                raise
        crash_point("put-done")
        log.debug("mirror %s: uploaded %r (%d bytes): hashed in %.2f s, sent in %.2f s",
                  m.rule.name, path, size, t1 - t0, trio.current_time() - t1)
        of = self.ops.open_files.get(ino) if self.ops is not None else None
        changed = (res.xxhash != whole or res.size != size
                   or (of is not None and (of.write_gen != gen or of.dirty)))
        uploads.record_upload(self.reg, idx, uploads.Uploaded(
            path, res.size, res.xxhash, chunks, node, old), changed, m.publish)
        if changed:
            raise Defer("file changed during upload; uploading again", 0.5)
