"""Several nodes, one set of mirrors: publish our changes, pull the others', resolve conflicts.

Owns the change feed of each mirror with ``pull = true``.

**Publishing.** When the uploader finishes an upload, rename, delete or metadata update on such
a mirror, it adds a record to the ``outbox`` (same transaction). A publisher writes the outbox
in batches as ``.mirrorfs/log/<node>/<first seq>-<last seq>.jsonl`` on the mirror, then drops
those records. A put record carries the whole-file and per-chunk xxhashes and ``prev``, the hash
of the object it replaced, so another node can stream and verify the file and tell a
fast-forward from a conflict.

**Pulling.** Every ``pull_interval`` a node lists ``.mirrorfs/log/``, and for each other node
applies the records after its cursor (kept per mirror identity -- endpoint, bucket, prefix --
and per node, so pointing a node at another bucket cannot reuse a stale cursor; no clocks are
compared). New and changed files become remote-only (streamed on first read), deleted ones
disappear, renamed ones move. Objects written by something other than mirrorfs are found by a
listing pass every ``rescan_interval``, in steps of ``pull_batch`` keys, resumable.

**Conflicts.** A record conflicts when this node's file is not the version the record replaced
(``prev``) and is not the record's version either: both changed it since they last agreed.
The mirror's ``leader`` (a node id, or ``remote`` for "the other node") wins on every node; the
loser's content is kept next to it as ``<name>.conflict-<loser node>-<hash8>`` (the same name on
every node) and a line goes to the conflict log (``mirrorfs conflicts``). A delete that meets a
local change keeps the local file. Nothing is ever dropped.

**Untrusted input.** Change-log objects and their records come from the mirror: each object
is read in pieces up to :data:`changelog.MAX_LOG_OBJECT` bytes and each record is checked by
:func:`changelog.parse_record` before anything is applied. One that fails is quarantined --
logged once, counted (``quarantined`` in ``stats``), listed by ``mirrorfs problems`` -- and
skipped; the cursor moves on past it (and past an object too big to read).

Limits: a directory rename travels as one rename per file; two nodes renaming one directory at
once can leave its files split between the two new names (each file ends in exactly one place,
no content is lost). Empty directories and symlinks do not travel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyfuse3
import trio

from mirrorfs.cache.db import MQ, ROOT_INO, Inode
from mirrorfs.cache.sync import (
    Handles,
    NoHandles,
    Outcome,
    SyncRecords,
    conflicts,
    emit,
    problems,
)
from mirrorfs.changelog import (
    MAX_FILE_SIZE,
    MAX_LOG_OBJECT,
    PUBLISH_BATCH,
    check_range,
    parse_record,
    valid_node,
)
from mirrorfs.control import Progress
from mirrorfs.errors import BadRecord, MirrorfsError, NotFound
from mirrorfs.names import reserved, safe_key
from mirrorfs.remotes.base import ObjectMeta

if TYPE_CHECKING:
    from mirrorfs.cache.registry import Registry
    from mirrorfs.cache.store import Store
    from mirrorfs.config import MirrorConfig
    from mirrorfs.daemon import Daemon
    from mirrorfs.fs import Operations
    from mirrorfs.uploader import MirrorState

log = logging.getLogger(__name__)

LOG_PREFIX = ".mirrorfs/log/"
#: how much of a quarantined record ``mirrorfs problems`` shows
EXCERPT = 160


__all__ = ["Sync", "cmd_conflicts", "cmd_problems", "cmd_pull", "emit", "sync_stats"]


class _Later(Exception):
    """A record that cannot be applied yet: the rest of its node's feed waits for the next
    round (records of one node are applied in order)."""


class _OpenFiles:
    """The open-file table of the mount, as the pull's records see it."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def is_open(self, ino: int) -> bool:
        return self.ops.is_open(ino)

    def is_writing(self, ino: int) -> bool:
        of = self.ops.open_files.get(ino)
        return of is not None and (of.dirty or of.writers > 0)


def _invalidate_inodes(inos: list[int]) -> None:
    """Make the kernel drop what it caches of each inode (run in a worker thread)."""
    for ino in inos:
        try:
            pyfuse3.invalidate_inode(ino, False)
        except (OSError, RuntimeError):
            pass  # not mounted (offline pull) or the kernel does not know the inode


def conflict_name(path: bytes, node: str, digest: bytes) -> bytes:
    head, _, name = path.rpartition(b"/")
    base = name + b".conflict-" + os.fsencode(node) + b"-" + digest.hex()[:8].encode()
    return head + b"/" + base if head else base


@dataclass
class SyncState:
    last_pull: float = 0.0  # wall time the last pull finished
    in_progress: bool = False
    applied: int = 0
    conflicts: int = 0
    last_error: str = ""
    wake: trio.Event = field(default_factory=trio.Event)


class Fetching(Protocol):
    """What pull needs of the fetcher: a whole remote-only file made local."""

    async def fetch_all(self, node: Inode) -> None: ...


class Sync:
    """Publisher and puller for one mirror.

    Constructed with what it uses: the registry and content store, the mount's open files
    (``ops``; None offline: no kernel to tell, no handle to detach), the fetcher (for the
    other node's version in a conflict we win), ``kick`` (the uploader: records applied here
    may have queued jobs) and this node's id."""

    def __init__(self, reg: Registry, store: Store, ops: Operations | None, fetcher: Fetching,
                 kick: Callable[[], None], node_id: str, mcfg: MirrorConfig,
                 mstate: MirrorState) -> None:
        self.reg = reg
        self.store = store
        self.ops = ops
        self.fetcher = fetcher
        self.kick = kick
        self.cfg = mcfg
        self.m = mstate
        self.idx = mstate.rule.index
        self.remote = mstate.remote
        self.node = node_id
        self.identity = mcfg.identity()
        self.state = SyncState()
        self.lock = trio.Lock()
        #: node -> seq of its record that waits (see _Later), logged once, not every round
        self.waits: dict[str, int] = {}
        self._stale: list[int] = []  # inodes whose cached pages the kernel must drop
        handles: Handles = NoHandles() if ops is None else _OpenFiles(ops)
        self.records = SyncRecords(reg, self.idx, self.identity, handles)

    # ------------------------------------------------------------ loop

    async def run(self) -> None:
        next_scan = 0.0
        while True:
            self.state.wake = trio.Event()
            try:
                await self.publish()
                await self.pull_log()
                if trio.current_time() >= next_scan:
                    if await self.rescan_step():
                        next_scan = trio.current_time() + self.cfg.rescan_interval
                    else:
                        next_scan = 0.0  # more to list: go on next round
            except MirrorfsError as exc:
                self.state.last_error = str(exc)
                log.info("pull from %s: %s", self.cfg.name, exc)
            with trio.move_on_after(self.cfg.pull_interval):
                await self.state.wake.wait()

    # ------------------------------------------------------------ publishing

    async def publish(self) -> int:
        """Write the outbox to the mirror's change log; returns records published."""
        # the other nodes refuse objects over MAX_LOG_OBJECT (half: headroom)
        recs = self.records.outbox_batch(PUBLISH_BATCH, MAX_LOG_OBJECT // 2)
        if not recs:
            return 0
        first, last = MQ.unpack(recs[0][0])[1], MQ.unpack(recs[-1][0])[1]
        key = f"{LOG_PREFIX}{self.node}/{first:012d}-{last:012d}.jsonl"
        with tempfile.NamedTemporaryFile("wb", delete=False) as f:
            f.write(b"\n".join(v for _k, v in recs) + b"\n")
            tmp = f.name
        try:
            await self.remote.put(key, tmp, ObjectMeta(os.path.getsize(tmp)))
        finally:
            os.unlink(tmp)
        self.records.published([k for k, _v in recs])
        return len(recs)

    # ------------------------------------------------------------ pulling the log

    async def pull_log(self, progress: Progress | None = None) -> int:
        async with self.lock:
            self.state.in_progress = True
            try:
                n = await self._pull_log(progress)
            finally:
                self.state.in_progress = False
            self.state.last_pull = time.time()
            return n

    async def _pull_log(self, progress: Progress | None) -> int:
        logs: list[tuple[str, int, int, str, int]] = []
        cursor = None
        while True:
            page = await self.remote.list(LOG_PREFIX, cursor, limit=1000)
            for st in page.entries:
                parts = st.key[len(LOG_PREFIX):].split("/")
                if len(parts) != 2 or not parts[1].endswith(".jsonl"):
                    continue
                node, name = parts
                try:
                    a, b = (int(x) for x in name[:-6].split("-"))
                except ValueError:
                    continue
                if node != self.node:
                    logs.append((node, a, b, st.key, st.size))
            if page.cursor is None:
                break
            cursor = page.cursor
        applied = 0
        waiting: set[str] = set()
        for node, a, b, key, size in sorted(logs, key=lambda x: (x[0], x[1], x[2])):
            if node in waiting:
                continue
            try:
                if not valid_node(node):
                    raise BadRecord(f"node name {node[:80]!r} is not one a node can have")
                check_range(a, b)
            except BadRecord as exc:
                self._quarantine(node, key, 0, None, str(exc), b"")
                continue  # not one of ours: the cursor stays, other objects go on
            done = self.records.node_done(node)
            if b <= done:
                continue
            try:
                if size > MAX_LOG_OBJECT:
                    raise BadRecord(f"{size} bytes, over the {MAX_LOG_OBJECT}-byte cap")
                body = await self._fetch_capped(key)
            except NotFound:
                continue  # compacted or being rewritten; the next round sees its successor
            except BadRecord as exc:
                self._quarantine(node, key, 0, None, str(exc), b"")
                self._skip_to(node, b)
                continue
            for lineno, line in enumerate(body.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    rec = parse_record(line, a, b)
                except BadRecord as exc:
                    self._quarantine(node, key, lineno, None, str(exc), line)
                    continue
                if rec["seq"] <= done:
                    continue
                try:
                    await self.apply(rec, node)
                except _Later as exc:
                    if self.waits.get(node) != rec["seq"]:
                        self.waits[node] = rec["seq"]
                        log.info("pull from %s: record %d of node %s waits for a later round: "
                                 "%s", self.cfg.name, rec["seq"], node, exc)
                    waiting.add(node)
                    break
                done = rec["seq"]
                applied += 1
                self.records.advance(node, done)
            else:
                # Every line was handled: quarantined lines at the end do not hold the
                # cursor back (the object would be read again every round).
                self._skip_to(node, b)
            if progress is not None:
                await progress({"applied": applied})
        self.state.applied += applied
        return applied

    def _skip_to(self, node: str, seq: int) -> None:
        self.records.advance(node, seq)

    async def _fetch_capped(self, key: str) -> bytes:
        """The whole object, read in the stream's pieces; BadRecord past MAX_LOG_OBJECT (the
        listing's size may lie)."""
        out = bytearray()
        async with self.remote.open_read(key) as stream:
            while chunk := await stream.read():
                out += chunk
                if len(out) > MAX_LOG_OBJECT:
                    raise BadRecord(f"longer than the {MAX_LOG_OBJECT}-byte cap")
        return bytes(out)

    def _quarantine(self, node: str, key: str, line: int, seq: int | None, problem: str,
                    raw: bytes) -> None:
        """Record a change-log record (``line`` > 0) or a whole object (``line`` 0) that
        failed its checks: logged and counted the first time only, listed by ``problems``."""
        entry = {"time": time.time(), "kind": "change-log record" if line else
                 "change-log object", "mirror": self.cfg.name, "node": node,
                 "object": key, "line": line, "seq": seq, "problem": problem,
                 "excerpt": raw[:EXCERPT].decode("utf-8", "backslashreplace")}
        if not self.records.quarantine(key, line, entry):
            return
        log.warning("pull from %s: %s (%s, node %r) quarantined: %s", self.cfg.name, key,
                    f"line {line}" if line else "whole object", node, problem)

    # ------------------------------------------------------------ applying one record

    async def apply(self, rec: dict[str, Any], node: str) -> None:
        """Apply one record that :func:`changelog.parse_record` accepted."""
        op = rec["op"]
        path = os.fsencode(rec["path"])
        if op == "put":
            await self._apply_put(rec, path, node)
        elif op == "delete":
            self._apply_delete(rec, path, node)
        elif op == "rename":
            await self._apply_rename(rec, os.fsencode(rec["from"]), path, node)
        await self._flush_invalidations()
        self.kick()

    def _invalidate(self, node: Inode, content: bool) -> None:
        """Drop the kernel's cached entry of ``node`` now, and with ``content`` its cached
        attributes and pages at the next :meth:`_flush_invalidations`."""
        if self.ops is None:
            return  # not mounted (offline): the kernel caches nothing
        if content:
            self._stale.append(node.ino)
        pyfuse3.invalidate_entry_async(node.parent, node.name, ignore_enoent=True)

    async def _flush_invalidations(self) -> None:
        """Invalidate the pages of the inodes :meth:`_invalidate` collected, in a worker
        thread and outside any transaction: ``pyfuse3.invalidate_inode`` blocks until the
        kernel has written back the inode's dirty pages (writeback cache), and those writes
        are requests this (trio) thread must answer -- called here, it would deadlock."""
        if not self._stale:
            return
        inos, self._stale = self._stale, []
        # A daemon thread rather than trio.to_thread: if the mount stops while the kernel
        # waits for writes nobody will answer, the thread is abandoned, not waited for.
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def work() -> None:
            try:
                _invalidate_inodes(inos)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        threading.Thread(target=work, name="mirrorfs-invalidate", daemon=True).start()
        await done.wait()

    async def _apply_put(self, rec: dict[str, Any], path: bytes, node_name: str) -> None:
        out = self.records.apply_put(rec, path)
        self._after(out)
        if out.refused == "blocked":
            log.warning("pull: %r from node %s: a file is in the way of its directory",
                        os.fsdecode(path), node_name)
        elif out.refused:
            log.warning("pull: %r from node %s: a directory is in the way",
                        os.fsdecode(path), node_name)
        if out.later:
            raise _Later(out.later)
        if out.conflict is not None:
            await self._conflict(rec, path, node_name, *out.conflict)

    def _after(self, out: Outcome) -> None:
        """What a transaction of :class:`SyncRecords` left to do once committed: a cache file
        no longer the inode's content goes (readers keep the old file, new opens get the new
        one), and the kernel drops what it caches."""
        for ino in out.dropped:
            if self.ops is not None:
                self.ops.detach(ino)
            self.store.remove(ino)
        for node, content in out.invalidate:
            self._invalidate(node, content)

    async def _conflict(self, rec: dict[str, Any], path: bytes, other: str, node: Inode,
                        ours: bytes) -> None:
        theirs = bytes.fromhex(rec["hash"])
        leader = self.cfg.leader
        we_win = leader == self.node
        loser_node, loser_hash = (other, theirs) if we_win else (self.node, ours)
        cname = conflict_name(path, loser_node, loser_hash)
        entry = {"time": time.time(), "path": os.fsdecode(path),
                 "conflict_path": os.fsdecode(cname), "mirror": self.cfg.name,
                 "winner": self.node if we_win else other, "loser": loser_node,
                 "winner_hash": (ours if we_win else theirs).hex(),
                 "loser_hash": loser_hash.hex()}
        log.warning("conflict on %r between this node (%s) and %s: %s wins; the other "
                    "version is kept as %r", os.fsdecode(path), self.node, other,
                    entry["winner"], os.fsdecode(cname))
        if we_win:
            await self._keep_theirs_aside(rec, path, cname, node)
        else:
            self._move_ours_aside(rec, path, cname, node)
        self.records.record_conflict(node.ino, entry)
        self.state.conflicts += 1

    async def _keep_theirs_aside(self, rec: dict[str, Any], path: bytes, cname: bytes,
                                 node: Inode) -> None:
        """We win: download their bytes to the conflict name, then put ours back on the key."""
        aside = self.records.set_theirs_aside(rec, path, cname)
        if aside is not None:
            # Hold the key so that our own upload cannot overwrite their bytes mid-download.
            async with self.m.busy.holding(path, aside.ino):
                try:
                    await self.fetcher.fetch_all(aside)
                except (MirrorfsError, OSError) as exc:
                    log.error("conflict on %r: could not fetch the other version (%s); it may "
                              "be gone from the mirror", os.fsdecode(path), exc)
            self.records.theirs_fetched(aside.ino)
        # Our version goes back onto the key (their upload overwrote it).
        self.records.drop_copy(node.ino, path, requeue=True)

    def _move_ours_aside(self, rec: dict[str, Any], path: bytes, cname: bytes,
                         node: Inode) -> None:
        """They win: our version moves to the conflict name; theirs takes the path."""
        reg = self.reg
        parent, name = self.records.forget_shared(node.ino, path)
        cbase = cname.rpartition(b"/")[2]
        try:
            reg.rename(parent, name, parent, cbase, 0)
        except OSError as exc:
            log.error("conflict on %r: cannot keep our version aside: %s",
                      os.fsdecode(path), exc)
            return
        self._invalidate(node, False)
        reg.entry_added(parent, cbase)  # the kernel may hold a negative entry of that name
        made = self.records.take_theirs(rec, path)
        if made is not None:
            self._invalidate(made, False)

    def _apply_delete(self, rec: dict[str, Any], path: bytes, other: str) -> None:
        reg, r = self.reg, self.records
        with reg.db.begin() as txn:
            node = r.lookup(txn, path)
            if node is None or not stat.S_ISREG(node.mode):
                return
            rc = reg.remote_copy(txn, self.idx, node.ino, path)
            entry = r.entry(txn, path)
            gone = bytes.fromhex(rec["hash"]) if rec.get("hash") else None
            ours = r.current_hash(node)
            same = gone is not None and (ours == gone or (rc is not None and rc.hash == gone))
            dirty = r.dirty_here(txn, node.ino)
        if not same or dirty:
            log.warning("pull: node %s deleted %r, which changed here: kept",
                        other, os.fsdecode(path))
            r.drop_copy(node.ino, path, requeue=True)
            return
        r.drop_copy(node.ino, path, requeue=False)  # already gone there
        deleted, may_go = reg.unlink(*entry, want_dir=False)  # (one name of a linked file)
        if may_go:
            self.store.remove(deleted.ino)
        self._invalidate(node, False)

    async def _apply_rename(self, rec: dict[str, Any], src: bytes, dst: bytes,
                            other: str) -> None:
        reg, r = self.reg, self.records
        with reg.db.begin() as txn:
            node = r.lookup(txn, src)
            ok = node is not None and stat.S_ISREG(node.mode)
            if ok:
                assert node is not None
                rc = reg.remote_copy(txn, self.idx, node.ino, src)
                entry = r.entry(txn, src)
                ours = r.current_hash(node)
                moved = bytes.fromhex(rec["hash"])
                ok = (ours == moved or (rc is not None and rc.hash == moved)) and \
                    not r.dirty_here(txn, node.ino)
        if not ok or node is None:
            # Not the file they moved (or changed here): treat it as a new file at dst.
            await self._apply_put({**rec, "op": "put", "prev": None}, dst, other)
            return
        parent = self._mkdirs(dst.rpartition(b"/")[0])
        if parent is None:
            return
        r.copy_moved(node.ino, src, dst)  # the object already moved on the mirror
        _moved, replaced, gone = reg.rename(*entry, parent,
                                            dst.rpartition(b"/")[2], 0)
        if replaced is not None and gone and stat.S_ISREG(replaced.mode):
            self.store.remove(replaced.ino)
        self._invalidate(node, False)
        # and the name it took: a negative entry of it, or the file it replaced
        reg.entry_added(parent, dst.rpartition(b"/")[2])
        self._rmdirs(src.rpartition(b"/")[0])

    def _mkdirs(self, dirpath: bytes) -> int | None:
        ino = ROOT_INO
        for part in [p for p in dirpath.split(b"/") if p]:
            child = self.reg.lookup(ino, part)
            if child is None:
                child = self.reg.mknode(ino, part, stat.S_IFDIR | 0o755, 0, 0)
                self.reg.entry_added(ino, part)
            elif not stat.S_ISDIR(child.mode):
                return None
            ino = child.ino
        return ino

    def _rmdirs(self, dirpath: bytes) -> None:
        """Remove directories a rename emptied, deepest first (best effort)."""
        while dirpath:
            with self.reg.db.begin() as txn:
                node = self.records.lookup(txn, dirpath)
                if node is None or not stat.S_ISDIR(node.mode) or \
                        next(self.reg.children_txn(txn, node.ino), None) is not None:
                    return
            try:
                self.reg.unlink(node.parent, node.name, want_dir=True)
            except OSError:
                return
            self._invalidate(node, False)
            dirpath = dirpath.rpartition(b"/")[0]

    # ------------------------------------------------------------ listing pass

    async def rescan_step(self, progress: Progress | None = None) -> bool:
        """One step of the listing pass; True when the pass is complete."""
        page = await self.remote.list("", self.records.scan_position(),
                                      limit=self.cfg.pull_batch)
        found = []
        for st in page.entries:
            path = safe_key(st.key)
            if path is None or reserved(path) or not 0 <= st.size <= MAX_FILE_SIZE:
                continue
            found.append((path, st.size, st.mtime_ns or time.time_ns()))
        added = self.records.add_listed(found, page.cursor)
        for made in added:
            self._invalidate(made, False)
        if progress is not None:
            await progress({"listed": len(page.entries), "added": len(added)})
        return page.cursor is None

# ---------------------------------------------------------------- control commands


async def cmd_pull(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Pull now: publish, apply the change logs, and run a whole listing pass in steps."""
    syncs = [s for s in d.syncs if req.get("mirror") in (None, s.cfg.name)]
    if not syncs:
        raise LookupError("no mirror with pull = true" + (f" named {req['mirror']!r}"
                                                          if req.get("mirror") else ""))
    out = {}
    for s in syncs:
        published = await s.publish()
        applied = await s.pull_log(progress)
        steps = 1
        while not await s.rescan_step(progress):
            steps += 1
        out[s.cfg.name] = {"published": published, "applied": applied, "scan_steps": steps}
    return out


async def cmd_conflicts(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    return conflicts(d.reg.db)


async def cmd_problems(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Input from the mirrors that was quarantined (see :meth:`Sync._quarantine`)."""
    return sorted(problems(d.reg.db), key=lambda p: p["time"])


def sync_stats(d: Daemon) -> dict[str, Any]:
    now = time.time()
    return {s.cfg.name: {"last_pull": s.state.last_pull or None,
                         "in_progress": s.state.in_progress,
                         "lag": (now - s.state.last_pull) if s.state.last_pull else None,
                         "applied": s.state.applied, "conflicts": s.state.conflicts,
                         "last_error": s.state.last_error}
            for s in getattr(d, "syncs", [])}

