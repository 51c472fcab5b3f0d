"""The audit: does each mirror hold what the registry says it holds?

Owns the audit schedule of each mirror and the findings of its last audit. The figures are
LMDB counters (``m<i>.audit_*``), so ``stats`` shows them after a restart too; the keys of
the last findings are kept in memory for ``verify --remote``.

A mirror can lose objects (a bucket recreated, a directory wiped, a disk restored from an
old backup), or someone can change them, without mirrorfs taking part; and a crash used to
leave objects and temp files behind. The uploader only ever compares the registry with
itself, so nothing else would notice. One audit of a mirror:

1. removes what cut transfers left (``Remote.clean_temps``): on a mirror only this node
   writes, everything of that kind not started by this process; on a multi-node mirror
   only what is older than ``TEMP_MAX_AGE`` (another node may be uploading right now).
   At start-up (before any audit, and ``drain`` waits for it) the same is done in the
   directories that uploads cut by the last stop were writing to (their ``pending``
   records), and for S3's incomplete multipart uploads;
2. takes a snapshot of the keys the registry says the mirror holds (``rpath``/``remote``);
3. lists the mirror once, paced (``PAGE``, ``PACE``), and compares each object:

   - owned by a record: its size must be the recorded size; where the remote keeps our
     metadata, an object new since the last audit (or every object at the first one) is
     also stat'ed and its stored hash compared; ``deep`` reads the whole object and hashes
     it. A difference is *changed*;
   - owned by nothing and carrying our ``writer`` id: *stray* (ours, left over), deleted
     under the mirror's delete policy; anything else owned by nothing is *foreign* (another
     node's or someone else's): listed, never deleted;

4. every snapshot key the listing did not have is *missing*.

A finding is acted on only if it still holds when it is acted on: the record is the one in
the snapshot, no job of the inode is in flight, and the key is not busy (an upload or a
rename of that key may be half done). Missing and changed objects are re-queued (the record
is dropped, the inode's job touched): a mirror that lost data heals with no operator action,
and ``drain`` waits for those jobs like any other.

``verify --remote`` runs :meth:`Auditor.audit` on demand, acting only with ``--repair``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import xxhash

from mirrorfs.cache import admin_ops as ops
from mirrorfs.cache.db import PEND_UPLOAD, U16, U64, RemoteCopy, get_counter
from mirrorfs.cache.journal import Signal
from mirrorfs.errors import MirrorfsError, NotFound, PermanentRemoteError

if TYPE_CHECKING:
    import lmdb

    from mirrorfs.cache.registry import Registry
    from mirrorfs.config import MirrorConfig
    from mirrorfs.uploader import MirrorState

log = logging.getLogger(__name__)

#: Keys per LIST request of an audit, and seconds between the audit's requests (the rate
#: limit: an audit never competes with uploads for more than one request at a time).
PAGE = 1000
PACE = 0.05
#: Temp objects older than this are removed on multi-node mirrors (seconds).
TEMP_MAX_AGE = 24 * 3600.0
#: Slack for clocks when deciding whether an object changed since the last audit (seconds).
CLOCK_SLACK = 120.0
#: Timestamps some file systems keep (FAT: 2 s) are coarser than the ones we set.
MTIME_SLACK_NS = 2_000_000_000
#: How many keys of each kind the last audit keeps for `verify --remote`.
KEEP_KEYS = 100

KINDS = ("missing", "changed", "stray", "foreign", "temps")


@dataclass
class Findings:
    """What one audit of one mirror found (counts and the first keys of each kind)."""

    checked: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    keys: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    repaired: list[str] = field(default_factory=list)
    error: str = ""

    def add(self, kind: str, key: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if len(self.keys[kind]) < KEEP_KEYS:
            self.keys[kind].append(f"{key}: {detail}" if detail else key)

    @property
    def wrong(self) -> int:
        return self.counts["missing"] + self.counts["changed"] + self.counts["stray"]


def _ctr(idx: int, name: str) -> bytes:
    return b"m%d.audit_%s" % (idx, name.encode())


class Auditor:
    """The audits of every mirror of a running mount.

    Constructed with what it uses: the registry, the mirrors' config, and ``kick`` (wake the
    upload schedulers: an audit that repairs queues jobs). Built before any job runs: it
    reads the cut uploads' records."""

    def __init__(self, reg: Registry, mirrors: Sequence[MirrorConfig],
                 kick: Callable[[], None]) -> None:
        self.reg = reg
        self.db = reg.db
        self.mirrors = mirrors
        self.kick = kick
        #: our mark on the objects we write (as the uploader's ObjectMeta.writer)
        self.writer = reg.db.registry_id
        #: deep audits hash what they read one object at a time (paced), in one thread
        self.hash_limiter = trio.CapacityLimiter(1)
        self.started = time.time()
        self.last: dict[str, Findings] = {}
        #: mirrors whose start-up clean-up of temp objects is done (drain waits for it)
        self.swept: set[str] = set()
        self.swept_changed = Signal()  # `drain` waits for the sweeps
        self._running: dict[str, trio.Lock] = {}
        #: per mirror, the directories uploads were writing to when the last run stopped
        #: (the ``pending`` upload records, read before any job runs): the only places a
        #: crash can have left temp files since the last full audit
        self.cut_dirs = {r.index: self._upload_dirs(r.index) for r in reg.mirrors}

    def _upload_dirs(self, idx: int) -> list[str]:
        dirs = set()
        prefix = U16.pack(idx)
        with self.db.begin() as txn:
            cur = txn.cursor(db=self.db.db["pending"])
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:2] != prefix:
                        break
                    if bytes(v[:1]) == PEND_UPLOAD:
                        dirs.add(os.fsdecode(bytes(k[10:]).rpartition(b"/")[0]))
        return sorted(dirs)

    # ------------------------------------------------------------ scheduling

    async def run(self, m: MirrorState) -> None:
        """Per mirror: clean up cut transfers at start, then audit every ``audit_interval``."""
        cfg = next(c for c in self.mirrors if c.name == m.rule.name)
        interval = cfg.audit_interval
        while m.rule.name not in self.swept:
            if m.up:
                try:
                    await self.clean_temps(m, Findings(), self.cut_dirs.get(m.rule.index, []))
                except PermanentRemoteError as exc:  # e.g. not allowed to list uploads
                    log.info("mirror %s: cannot clean up temp objects: %s", m.rule.name, exc)
                    self.swept.add(m.rule.name)
                    self.swept_changed.fire()
                except MirrorfsError as exc:
                    log.info("mirror %s: clean-up of temp objects failed: %s", m.rule.name,
                             exc)
                else:
                    self.swept.add(m.rule.name)
                    self.swept_changed.fire()
                    break
            await trio.sleep(1.0)
        if interval <= 0:
            return
        while True:
            with self.db.begin() as txn:
                last = get_counter(txn, self.reg.counters, _ctr(m.rule.index, "last"))
            wait = last + interval - time.time()
            if wait > 0:
                await trio.sleep(wait)
                continue
            if not m.up or m.paused:
                await trio.sleep(min(interval, 5.0))
                continue
            await self.audit(m, deep=cfg.audit_deep, repair=True)

    # ------------------------------------------------------------ one audit

    async def audit(self, m: MirrorState, deep: bool = False, repair: bool = True) -> Findings:
        """Compare mirror ``m`` with the registry; act on the findings if ``repair``."""
        lock = self._running.setdefault(m.rule.name, trio.Lock())
        async with lock:
            f = Findings()
            t0 = time.time()
            try:
                await self._audit(m, f, deep, repair)
            except MirrorfsError as exc:
                f.error = str(exc)
                log.info("mirror %s: audit stopped: %s", m.rule.name, exc)
                return f
            idx = m.rule.index
            prev = ops.record_audit(self.reg, idx, int(t0), int(time.time()), f.checked,
                                    {k: f.counts[k] for k in KINDS})
            self.last[m.rule.name] = f
            found = {k: v for k, v in f.counts.items() if v}
            log.info("mirror %s: audit%s of %d objects in %.1fs%s (previous %s)", m.rule.name,
                     " (deep)" if deep else "", f.checked, time.time() - t0,
                     f": {found}" if found else ": all as recorded",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(prev)) if prev
                     else "never")
            if repair and (f.counts["missing"] or f.counts["changed"]):
                self.kick()
            return f

    async def clean_temps(self, m: MirrorState, f: Findings,
                          dirs: list[str] | None = None) -> None:
        """Remove what cut transfers left: in ``dirs`` (at start-up), else everywhere."""
        cfg = next(c for c in self.mirrors if c.name == m.rule.name)
        cutoff = time.time() - TEMP_MAX_AGE if cfg.pull else self.started
        n = await m.remote.clean_temps(cutoff, dirs)
        if n:
            f.counts["temps"] += n
            ops.add_counter(self.reg, _ctr(m.rule.index, "temps_removed"), n)
            log.info("mirror %s: removed %d temp object(s) of cut transfers", m.rule.name, n)

    def _snapshot(self, idx: int) -> dict[bytes, tuple[int, bytes]]:
        """Key -> (owner, packed record) of everything the registry says the mirror holds."""
        out: dict[bytes, tuple[int, bytes]] = {}
        reg = self.reg
        prefix = U16.pack(idx)
        with reg.db.begin() as txn:
            cur = txn.cursor(db=reg.db.db["rpath"])
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:2] != prefix:
                        break
                    ino = U64.unpack(v)[0]
                    rc = reg.remote_copy(txn, idx, ino, bytes(k[2:]))  # (one per hard link)
                    out[bytes(k[2:])] = (ino, rc.pack() if rc is not None else b"")
        return out

    def _pending_keys(self, idx: int) -> set[bytes]:
        """Keys some job has an unfinished step on (an upload in flight or cut)."""
        reg = self.reg
        prefix = U16.pack(idx)
        keys = set()
        with reg.db.begin() as txn:
            cur = txn.cursor(db=reg.db.db["pending"])
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if k[:2] != prefix:
                        break
                    keys.add(bytes(k[10:]))
        return keys

    def _still(self, m: MirrorState, key: bytes, ino: int, packed: bytes) -> bool:
        """The snapshot's record of ``key`` still holds and no job is touching it."""
        if key in m.busy or ino in m.in_flight:
            return False
        with self.db.begin() as txn:
            if self.reg.rpath_owner(txn, m.rule.index, key) != ino:
                return False
            rc = self.reg.remote_copy(txn, m.rule.index, ino, key)
            return rc is not None and rc.pack() == packed

    async def _audit(self, m: MirrorState, f: Findings, deep: bool, repair: bool) -> None:
        idx = m.rule.index
        await self.clean_temps(m, f)
        cfg = next(c for c in self.mirrors if c.name == m.rule.name)
        # On a multi-node mirror another node's change shows as a missing or changed object
        # until the pull applies it: re-uploading ours would undo it. Reported only there.
        heal = repair and not cfg.pull
        with self.db.begin() as txn:
            since = float(get_counter(txn, self.reg.counters, _ctr(idx, "started")))
        since -= CLOCK_SLACK
        snap = self._snapshot(idx)
        seen: set[bytes] = set()
        cursor = None
        while True:
            page = await m.remote.list("", cursor, limit=PAGE)
            for st in page.entries:
                key = os.fsencode(st.key)
                if key == b".mirrorfs" or key.startswith(b".mirrorfs/"):
                    continue  # reserved: the multi-node change log
                f.checked += 1
                seen.add(key)
                if key in snap:
                    await self._check_owned(m, f, key, snap[key], st.size, st.mtime_ns,
                                            since, deep, heal)
                else:
                    await self._check_unowned(m, f, key, st.mtime_ns, repair)
                await trio.sleep(0)
            if page.cursor is None:
                break
            cursor = page.cursor
            await trio.sleep(PACE)
        for key, (ino, packed) in snap.items():
            if key in seen or not self._still(m, key, ino, packed):
                continue
            f.add("missing", os.fsdecode(key))
            log.log(logging.WARNING if heal else logging.INFO,
                    "mirror %s: %r is missing (the mirror lost it)%s", m.rule.name,
                    os.fsdecode(key), "; uploading it again" if heal else "")
            if heal:
                self._requeue(m, ino, key, f)

    async def _check_owned(self, m: MirrorState, f: Findings, key: bytes,
                           snap: tuple[int, bytes], size: int, mtime_ns: int | None,
                           since: float, deep: bool, repair: bool) -> None:
        ino, packed = snap
        if not packed:
            return
        rc = RemoteCopy.unpack(packed)
        problem = None
        recorded_hash = rc.hash.strip(b"\0") != b""
        if size != rc.size:
            problem = f"size {size}, recorded {rc.size}"
        elif (m.remote.keeps_mtime and mtime_ns is not None
              and abs(mtime_ns - rc.mtime_ns) > MTIME_SLACK_NS):
            problem = "modified time differs from the recorded one"
        elif m.remote.keeps_meta and (mtime_ns is None or mtime_ns / 1e9 >= since):
            try:
                meta = (await m.remote.stat(os.fsdecode(key))).meta
            except NotFound:
                return  # gone since the listing: the next audit sees it
            if meta is None or meta.xxhash is None:
                problem = "our metadata is gone"
            elif recorded_hash and meta.xxhash != rc.hash.hex():
                problem = "stored hash differs"
            await trio.sleep(PACE)
        if problem is None and deep and recorded_hash:
            digest = await self._hash_object(m, key)
            if digest is None:
                return
            if digest != rc.hash:
                problem = "content does not match its xxhash"
        if problem is None or not self._still(m, key, ino, packed):
            return
        f.add("changed", os.fsdecode(key), problem)
        log.log(logging.WARNING if repair else logging.INFO,
                "mirror %s: %r was changed behind our back (%s)%s", m.rule.name,
                os.fsdecode(key), problem, "; uploading it again" if repair else "")
        if repair:
            self._requeue(m, ino, key, f)

    async def _hash_object(self, m: MirrorState, key: bytes) -> bytes | None:
        h = xxhash.xxh3_128()
        limiter = self.hash_limiter
        try:
            async with m.remote.open_read(os.fsdecode(key)) as stream:
                while data := await stream.read():
                    await trio.to_thread.run_sync(h.update, data, limiter=limiter)
        except NotFound:
            return None
        return h.digest()

    async def _check_unowned(self, m: MirrorState, f: Findings, key: bytes,
                             mtime_ns: int | None, repair: bool) -> None:
        if key in m.busy or key in self._pending_keys(m.rule.index):
            return  # an upload to it is in flight, or cut and waiting for its job
        try:
            meta = (await m.remote.stat(os.fsdecode(key))).meta
        except NotFound:
            return
        writer = self.writer
        if meta is None or not writer or meta.writer != writer:
            f.add("foreign", os.fsdecode(key))
            log.info("mirror %s: %r is not ours (foreign); left alone", m.rule.name,
                     os.fsdecode(key))
            return
        with self.db.begin() as txn:
            if self.reg.rpath_owner(txn, m.rule.index, key) is not None:
                return  # recorded since the listing
        if key in m.busy or key in self._pending_keys(m.rule.index):
            return
        f.add("stray", os.fsdecode(key))
        policy = m.rule.delete_policy
        age = time.time() - mtime_ns / 1e9 if mtime_ns else float("inf")
        if not repair or policy == "never" or (policy == "delayed"
                                               and age < m.rule.delete_delay):
            log.info("mirror %s: %r is ours and owned by no file (stray); kept (%s)",
                     m.rule.name, os.fsdecode(key), "delete policy" if repair else "report")
            return
        m.busy[key] = 0
        try:
            await m.remote.delete(os.fsdecode(key))
        finally:
            m.busy.pop(key, None)
        f.repaired.append(os.fsdecode(key))
        log.info("mirror %s: deleted %r, ours and owned by no file (stray)", m.rule.name,
                 os.fsdecode(key))

    def _requeue(self, m: MirrorState, ino: int, key: bytes, f: Findings) -> None:
        ops.requeue_copy(self.reg, m.rule.index, ino, key)
        f.repaired.append(os.fsdecode(key))


def audit_stats(reg: Registry, txn: lmdb.Transaction, idx: int) -> dict[str, Any]:
    """The last audit's figures of mirror ``idx`` for `stats` (from LMDB: also offline)."""
    c = reg.counters
    last = get_counter(txn, c, _ctr(idx, "last"))
    out: dict[str, Any] = {"audit_last": last or None,
                           "audit_runs": get_counter(txn, c, _ctr(idx, "runs")),
                           "audit_checked": get_counter(txn, c, _ctr(idx, "checked")),
                           # since the registry was made, at start-ups and audits
                           "temps_removed": get_counter(txn, c, _ctr(idx, "temps_removed"))}
    for k in KINDS:
        out[f"audit_{k}"] = get_counter(txn, c, _ctr(idx, k))
    return out
