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
import json
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
import pyfuse3
import trio

from mirrorfs.cache.db import (
    LOCAL_FULL,
    LOCAL_NONE,
    MQ,
    U16,
    U64,
    Inode,
    RemoteCopy,
    bump_counter,
    get_counter,
    set_counter,
)
from mirrorfs.changelog import (
    MAX_FILE_SIZE,
    MAX_LOG_OBJECT,
    PUBLISH_BATCH,
    check_range,
    parse_record,
    reserved,
    valid_node,
)
from mirrorfs.control import Progress
from mirrorfs.errors import BadRecord, MirrorfsError, NotFound
from mirrorfs.maintenance import safe_key

if TYPE_CHECKING:
    from mirrorfs.config import MirrorConfig
    from mirrorfs.mount import Daemon
    from mirrorfs.uploader import MirrorState

log = logging.getLogger(__name__)

LOG_PREFIX = ".mirrorfs/log/"
#: how much of a quarantined record ``mirrorfs problems`` shows
EXCERPT = 160


class _Later(Exception):
    """A record that cannot be applied yet: the rest of its node's feed waits for the next
    round (records of one node are applied in order)."""


def emit(txn: lmdb.Transaction, daemon_db: Any, mirror: int, rec: dict[str, Any]) -> None:
    """Add a change record to the outbox (called by the uploader in its completion txn)."""
    counters = daemon_db.db["counters"]
    seq = get_counter(txn, counters, b"m%d.outbox_seq" % mirror) + 1
    set_counter(txn, counters, b"m%d.outbox_seq" % mirror, seq)
    rec["seq"] = seq
    txn.put(MQ.pack(mirror, seq), json.dumps(rec).encode(), db=daemon_db.db["outbox"])


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


class Sync:
    """Publisher and puller for one mirror."""

    def __init__(self, d: Daemon, mcfg: MirrorConfig, mstate: MirrorState) -> None:
        self.d = d
        self.cfg = mcfg
        self.m = mstate
        self.idx = mstate.rule.index
        self.remote = mstate.remote
        self.node = d.cfg.node_id
        self.identity = mcfg.identity()
        self.state = SyncState()
        self.lock = trio.Lock()
        #: node -> seq of its record that waits (see _Later), logged once, not every round
        self.waits: dict[str, int] = {}
        self._stale: list[int] = []  # inodes whose cached pages the kernel must drop

    # ------------------------------------------------------------ cursors

    def _cursor_key(self, what: str) -> bytes:
        return f"pull:{self.identity}:{what}".encode()

    def _get_cursor(self, txn: lmdb.Transaction, what: str) -> bytes | None:
        v = txn.get(self._cursor_key(what), db=self.d.reg.db.db["cursors"])
        return bytes(v) if v is not None else None

    def _set_cursor(self, txn: lmdb.Transaction, what: str, value: bytes | None) -> None:
        key = self._cursor_key(what)
        if value is None:
            txn.delete(key, db=self.d.reg.db.db["cursors"])
        else:
            txn.put(key, value, db=self.d.reg.db.db["cursors"])

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
        outbox = self.d.reg.db.db["outbox"]
        with self.d.reg.db.begin() as txn:
            cur = txn.cursor(db=outbox)
            recs: list[tuple[bytes, bytes]] = []
            nbytes = 0
            if cur.set_range(U16.pack(self.idx)):
                for k, v in cur:
                    # the other nodes refuse objects over MAX_LOG_OBJECT (half: headroom)
                    if k[:2] != U16.pack(self.idx) or len(recs) >= PUBLISH_BATCH or \
                            (recs and nbytes + len(v) + 1 > MAX_LOG_OBJECT // 2):
                        break
                    recs.append((bytes(k), bytes(v)))
                    nbytes += len(v) + 1
        if not recs:
            return 0
        first, last = MQ.unpack(recs[0][0])[1], MQ.unpack(recs[-1][0])[1]
        key = f"{LOG_PREFIX}{self.node}/{first:012d}-{last:012d}.jsonl"
        with tempfile.NamedTemporaryFile("wb", delete=False) as f:
            f.write(b"\n".join(v for _k, v in recs) + b"\n")
            tmp = f.name
        try:
            from mirrorfs.remotes.base import ObjectMeta

            await self.remote.put(key, tmp, ObjectMeta(os.path.getsize(tmp)))
        finally:
            os.unlink(tmp)
        with self.d.reg.db.begin(write=True) as txn:
            for k, _v in recs:
                txn.delete(k, db=outbox)
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
            with self.d.reg.db.begin() as txn:
                v = self._get_cursor(txn, "node:" + node)
            done = U64.unpack(v)[0] if v else 0
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
                with self.d.reg.db.begin(write=True) as txn:
                    self._set_cursor(txn, "node:" + node, U64.pack(done))
            else:
                # Every line was handled: quarantined lines at the end do not hold the
                # cursor back (the object would be read again every round).
                self._skip_to(node, b)
            if progress is not None:
                await progress({"applied": applied})
        self.state.applied += applied
        return applied

    def _skip_to(self, node: str, seq: int) -> None:
        with self.d.reg.db.begin(write=True) as txn:
            v = self._get_cursor(txn, "node:" + node)
            if not v or U64.unpack(v)[0] < seq:
                self._set_cursor(txn, "node:" + node, U64.pack(seq))

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
        pkey = f"pull:{self.identity}:{key}".encode() + b"\0" + U64.pack(line)
        problems = self.d.reg.db.db["problems"]
        with self.d.reg.db.begin(write=True) as txn:
            if txn.get(pkey, db=problems) is not None:
                return
            entry = {"time": time.time(), "kind": "change-log record" if line else
                     "change-log object", "mirror": self.cfg.name, "node": node,
                     "object": key, "line": line, "seq": seq, "problem": problem,
                     "excerpt": raw[:EXCERPT].decode("utf-8", "backslashreplace")}
            txn.put(pkey, json.dumps(entry).encode(), db=problems)
            bump_counter(txn, self.d.reg.counters, b"quarantined", 1)
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
        self._kick()

    def _kick(self) -> None:
        if self.d.uploader is not None:
            self.d.uploader.kick()

    def _lookup(self, txn: lmdb.Transaction, path: bytes) -> Inode | None:
        from mirrorfs.cache.db import ROOT_INO

        node = self.d.reg.get_txn(txn, ROOT_INO)
        for part in path.split(b"/"):
            if node is None or not stat.S_ISDIR(node.mode):
                return None
            node = self.d.reg.lookup_txn(txn, node.ino, part)
        return node

    def _entry(self, txn: lmdb.Transaction, path: bytes) -> tuple[int, bytes]:
        """The (directory inode, name) of the entry at ``path`` (which exists): a file with
        hard links has several, and a record is about this one."""
        from mirrorfs.cache.db import ROOT_INO

        head, _, name = path.rpartition(b"/")
        parent = self._lookup(txn, head) if head else self.d.reg.get_txn(txn, ROOT_INO)
        assert parent is not None
        return parent.ino, name

    def _split(self, txn: lmdb.Transaction, node: Inode, path: bytes) -> None:
        """``path`` is one of several names of ``node`` (hard links here) and takes another
        node's version: to the other nodes every path is a file of its own. The name leaves
        the inode, which keeps its other names and its content; the object at ``path`` is
        the other node's now, so our record of it goes without a remote delete. The caller
        then registers ``path`` as a new file."""
        reg = self.d.reg
        reg.drop_remote(txn, self.idx, node.ino, path)
        reg.unlink_txn(txn, *self._entry(txn, path))
        self._invalidate(node, False)

    def _current_hash(self, txn: lmdb.Transaction, node: Inode) -> bytes | None:
        if node.hash_ver == node.ver and node.hash_ver:
            return node.hash
        return None

    def _dirty_here(self, txn: lmdb.Transaction, ino: int) -> bool:
        """This node changed the file and the mirror has not got that change yet: a journal
        job, or a handle that is writing it. With the kernel's writeback cache the writes of
        an open file may not even have reached us yet (they come at writeback or close), so
        a file opened for writing counts as changed until its last handle is released; its
        changes are then committed and journaled as any others. Offline there are no handles.
        """
        if self.d.reg.journal.get(txn, self.idx, ino) is not None:
            return True
        ops = self.d.ops
        of = ops.open_files.get(ino) if ops is not None else None
        return of is not None and (of.dirty or of.writers > 0)

    def _invalidate(self, node: Inode, content: bool) -> None:
        """Drop the kernel's cached entry of ``node`` now, and with ``content`` its cached
        attributes and pages at the next :meth:`_flush_invalidations`."""
        if self.d.ops is None:
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

    def _remote_copy(self, rec: dict[str, Any], path: bytes, ver: int) -> RemoteCopy:
        return RemoteCopy(path, ver, bytes.fromhex(rec["hash"]), int(rec["size"]),
                          stat.S_IFREG | int(rec.get("mode", 0o644)), int(rec["mtime"]))

    def _store_chunks(self, txn: lmdb.Transaction, ino: int, ver: int,
                      rec: dict[str, Any]) -> None:
        if rec.get("chunks"):
            txn.put(U64.pack(ino), U64.pack(ver) + bytes.fromhex(rec["chunks"]),
                    db=self.d.reg.chunks)

    async def _apply_put(self, rec: dict[str, Any], path: bytes, node_name: str) -> None:
        reg = self.d.reg
        new_hash = bytes.fromhex(rec["hash"])
        prev = bytes.fromhex(rec["prev"]) if rec.get("prev") else None
        conflict = None
        with reg.db.begin(write=True) as txn:
            node = self._lookup(txn, path)
            if node is None:
                status, made = reg.add_remote_file(
                    txn, path, int(rec["size"]), int(rec["mtime"]),
                    int(rec.get("mode", 0o644)), new_hash, self.idx, path)
                if made is not None and status == "added":
                    self._store_chunks(txn, made.ino, made.ver, rec)
                    self._requeue_others(txn, made.ino, path)
                    self._invalidate(made, False)
                elif status == "blocked":
                    log.warning("pull: %r from node %s: a file is in the way of its directory",
                                os.fsdecode(path), node_name)
                return
            if not stat.S_ISREG(node.mode):
                log.warning("pull: %r from node %s: a directory is in the way",
                            os.fsdecode(path), node_name)
                return
            cur = self._current_hash(txn, node)
            rc = reg.remote_copy(txn, self.idx, node.ino, path)
            if node.nlink > 1 and cur != new_hash and not self._dirty_here(txn, node.ino):
                # One of several names here: that path alone takes their version.
                self._split(txn, node, path)
                _status, made = reg.add_remote_file(
                    txn, path, int(rec["size"]), int(rec["mtime"]),
                    int(rec.get("mode", 0o644)), new_hash, self.idx, path)
                if made is not None:
                    self._store_chunks(txn, made.ino, made.ver, rec)
                    self._requeue_others(txn, made.ino, path)
                    self._invalidate(made, False)
                return
            if cur == new_hash or (rc is not None and rc.hash == new_hash
                                   and not self._dirty_here(txn, node.ino)):
                # Already this version: at most the metadata changed.
                if (node.mode & 0o7777) != int(rec.get("mode", node.mode)) & 0o7777 \
                        or node.mtime_ns != int(rec["mtime"]):
                    node.mode = stat.S_IFREG | int(rec.get("mode", 0o644)) & 0o7777
                    node.mtime_ns = int(rec["mtime"])
                    txn.put(U64.pack(node.ino), node.pack(), db=reg.inodes)
                    self._invalidate(node, False)
                if rc is None or rc.hash != new_hash or rc.path != path:
                    reg.set_remote(txn, self.idx, node.ino,
                                   self._remote_copy(rec, path, node.ver))
                return
            agreed = (prev is not None and (cur == prev or (rc is not None and rc.hash == prev)))
            if agreed and not self._dirty_here(txn, node.ino):
                self._fast_forward(txn, node, rec, path)
                return
            conflict = (node, cur or (rc.hash if rc else b"\0" * 16))
        await self._conflict(rec, path, node_name, *conflict)

    def _fast_forward(self, txn: lmdb.Transaction, node: Inode, rec: dict[str, Any],
                      path: bytes) -> None:
        """The other node changed a file we had not: take its version (remote-only).

        A file open here gets a new inode (:meth:`Registry.supersede`) and the open one
        lives on as an orphan until its last release, its handles reading the old content:
        with the writeback cache the kernel never takes a new size from us for an inode it
        holds, so a fresh open of the same inode read the new content cut to the old size.
        A file not open is updated in place (the entry invalidation lets the kernel drop
        its inode). A file open here with a job in flight cannot get a new inode yet (see
        :meth:`Registry.supersede`), and updating it in place would cut the new content to
        the size the kernel holds: the record waits for a later round (:class:`_Later`)."""
        reg = self.d.reg
        ops = self.d.ops
        superseded = False
        if ops is not None and ops.is_open(node.ino):
            new = reg.supersede(txn, node)
            if new is None:
                raise _Later(f"{os.fsdecode(path)!r} is open here and a job of it is in flight")
            node, superseded = new, True
        old_size = node.size
        if node.local == LOCAL_FULL:
            reg.set_local(txn, node, LOCAL_NONE)
            if ops is not None:  # readers keep the old file, new opens get the new one
                ops.detach(node.ino)
            self.d.store.remove(node.ino)
        node.ver += 1
        node.size = int(rec["size"])
        node.mtime_ns = int(rec["mtime"])
        node.ctime_ns = time.time_ns()
        node.mode = stat.S_IFREG | (int(rec.get("mode", 0o644)) & 0o7777)
        node.hash = bytes.fromhex(rec["hash"])
        node.hash_ver = node.ver
        txn.put(U64.pack(node.ino), node.pack(), db=reg.inodes)
        reg.account_size(txn, node, old_size)
        self._store_chunks(txn, node.ino, node.ver, rec)
        reg.set_remote(txn, self.idx, node.ino, self._remote_copy(rec, path, node.ver))
        self._requeue_others(txn, node.ino, path)
        # The entry (the next lookup finds the new inode), and the pages of an inode updated
        # in place; a new inode has none yet.
        self._invalidate(node, not superseded)

    def _requeue_others(self, txn: lmdb.Transaction, ino: int, path: bytes) -> None:
        """This node's other mirrors lack the version just pulled: they get it from here."""
        for m in self.d.reg.mirrors:
            if m.index != self.idx and m.wants(path):
                self.d.reg.requeue(txn, ino, m.index)

    async def _conflict(self, rec: dict[str, Any], path: bytes, other: str, node: Inode,
                        ours: bytes) -> None:
        reg = self.d.reg
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
        with reg.db.begin(write=True) as txn:
            txn.put(struct.pack(">d", time.time()) + U64.pack(node.ino),
                    json.dumps(entry).encode(), db=reg.db.db["conflicts"])
        self.state.conflicts += 1

    async def _keep_theirs_aside(self, rec: dict[str, Any], path: bytes, cname: bytes,
                                 node: Inode) -> None:
        """We win: download their bytes to the conflict name, then put ours back on the key."""
        reg = self.d.reg
        with reg.db.begin(write=True) as txn:
            if self._lookup(txn, cname) is not None:
                aside = None
            else:
                _status, aside = reg.add_remote_file(
                    txn, cname, int(rec["size"]), int(rec["mtime"]),
                    int(rec.get("mode", 0o644)), bytes.fromhex(rec["hash"]), self.idx, path)
                if aside is not None:
                    # It reads their object under the shared key, but must not own that key.
                    reg.drop_remote(txn, self.idx, aside.ino, path)
                    txn.put(MQ.pack(self.idx, aside.ino),
                            self._remote_copy(rec, path, aside.ver).pack(), db=reg.remote)
                    self._store_chunks(txn, aside.ino, aside.ver, rec)
        if aside is not None:
            # Hold the key so that our own upload cannot overwrite their bytes mid-download.
            while self.m.busy.get(path, aside.ino) != aside.ino:
                await trio.sleep(0.1)
            self.m.busy[path] = aside.ino
            try:
                await self.d.fetcher.fetch_all(aside)
            except (MirrorfsError, OSError) as exc:
                log.error("conflict on %r: could not fetch the other version (%s); it may be "
                          "gone from the mirror", os.fsdecode(path), exc)
            finally:
                self.m.busy.pop(path, None)
            with reg.db.begin(write=True) as txn:
                txn.delete(MQ.pack(self.idx, aside.ino), db=reg.remote)
                cur = reg.get_txn(txn, aside.ino)
                if cur is not None and cur.local == LOCAL_FULL:
                    reg.requeue(txn, aside.ino, self.idx)
                    for m in reg.mirrors:
                        if m.index != self.idx:
                            reg.requeue(txn, aside.ino, m.index)
        with reg.db.begin(write=True) as txn:
            # Our version goes back onto the key (their upload overwrote it).
            reg.drop_remote(txn, self.idx, node.ino, path)
            reg.requeue(txn, node.ino, self.idx)

    def _move_ours_aside(self, rec: dict[str, Any], path: bytes, cname: bytes,
                         node: Inode) -> None:
        """They win: our version moves to the conflict name; theirs takes the path."""
        reg = self.d.reg
        with reg.db.begin(write=True) as txn:
            # Our object on the shared key is theirs now: forget it without deleting it.
            reg.drop_remote(txn, self.idx, node.ino, path)
            parent, name = self._entry(txn, path)
        cbase = cname.rpartition(b"/")[2]
        try:
            reg.rename(parent, name, parent, cbase, 0)
        except OSError as exc:
            log.error("conflict on %r: cannot keep our version aside: %s",
                      os.fsdecode(path), exc)
            return
        self._invalidate(node, False)
        reg.entry_added(parent, cbase)  # the kernel may hold a negative entry of that name
        with reg.db.begin(write=True) as txn:
            _status, made = reg.add_remote_file(
                txn, path, int(rec["size"]), int(rec["mtime"]), int(rec.get("mode", 0o644)),
                bytes.fromhex(rec["hash"]), self.idx, path)
            if made is not None:
                self._store_chunks(txn, made.ino, made.ver, rec)
                self._invalidate(made, False)

    def _apply_delete(self, rec: dict[str, Any], path: bytes, other: str) -> None:
        reg = self.d.reg
        with reg.db.begin() as txn:
            node = self._lookup(txn, path)
            if node is None or not stat.S_ISREG(node.mode):
                return
            rc = reg.remote_copy(txn, self.idx, node.ino, path)
            entry = self._entry(txn, path)
            gone = bytes.fromhex(rec["hash"]) if rec.get("hash") else None
            ours = self._current_hash(txn, node)
            same = gone is not None and (ours == gone or (rc is not None and rc.hash == gone))
            dirty = self._dirty_here(txn, node.ino)
        if not same or dirty:
            log.warning("pull: node %s deleted %r, which changed here: kept",
                        other, os.fsdecode(path))
            with reg.db.begin(write=True) as txn:
                reg.drop_remote(txn, self.idx, node.ino, path)
                reg.requeue(txn, node.ino, self.idx)
            return
        with reg.db.begin(write=True) as txn:
            reg.drop_remote(txn, self.idx, node.ino, path)  # already gone there
        deleted, may_go = reg.unlink(*entry, want_dir=False)  # (one name of a linked file)
        if may_go:
            self.d.store.remove(deleted.ino)
        self._invalidate(node, False)

    async def _apply_rename(self, rec: dict[str, Any], src: bytes, dst: bytes,
                            other: str) -> None:
        reg = self.d.reg
        with reg.db.begin() as txn:
            node = self._lookup(txn, src)
            ok = node is not None and stat.S_ISREG(node.mode)
            if ok:
                assert node is not None
                rc = reg.remote_copy(txn, self.idx, node.ino, src)
                entry = self._entry(txn, src)
                ours = self._current_hash(txn, node)
                moved = bytes.fromhex(rec["hash"])
                ok = (ours == moved or (rc is not None and rc.hash == moved)) and \
                    not self._dirty_here(txn, node.ino)
        if not ok or node is None:
            # Not the file they moved (or changed here): treat it as a new file at dst.
            await self._apply_put({**rec, "op": "put", "prev": None}, dst, other)
            return
        parent = self._mkdirs(dst.rpartition(b"/")[0])
        if parent is None:
            return
        with reg.db.begin(write=True) as txn:
            rc = reg.remote_copy(txn, self.idx, node.ino, src)
            if rc is not None:  # the object already moved on the mirror
                reg.set_remote(txn, self.idx, node.ino, RemoteCopy(
                    dst, rc.ver, rc.hash, rc.size, rc.mode, rc.mtime_ns))
                reg.drop_remote(txn, self.idx, node.ino, src)
        _moved, replaced, gone = reg.rename(*entry, parent,
                                            dst.rpartition(b"/")[2], 0)
        if replaced is not None and gone and stat.S_ISREG(replaced.mode):
            self.d.store.remove(replaced.ino)
        self._invalidate(node, False)
        # and the name it took: a negative entry of it, or the file it replaced
        reg.entry_added(parent, dst.rpartition(b"/")[2])
        self._rmdirs(src.rpartition(b"/")[0])

    def _mkdirs(self, dirpath: bytes) -> int | None:
        from mirrorfs.cache.db import ROOT_INO

        ino = ROOT_INO
        for part in [p for p in dirpath.split(b"/") if p]:
            child = self.d.reg.lookup(ino, part)
            if child is None:
                child = self.d.reg.mknode(ino, part, stat.S_IFDIR | 0o755, 0, 0)
                self.d.reg.entry_added(ino, part)
            elif not stat.S_ISDIR(child.mode):
                return None
            ino = child.ino
        return ino

    def _rmdirs(self, dirpath: bytes) -> None:
        """Remove directories a rename emptied, deepest first (best effort)."""
        while dirpath:
            with self.d.reg.db.begin() as txn:
                node = self._lookup(txn, dirpath)
                if node is None or not stat.S_ISDIR(node.mode) or \
                        next(self.d.reg.children_txn(txn, node.ino), None) is not None:
                    return
            try:
                self.d.reg.unlink(node.parent, node.name, want_dir=True)
            except OSError:
                return
            self._invalidate(node, False)
            dirpath = dirpath.rpartition(b"/")[0]

    # ------------------------------------------------------------ listing pass

    async def rescan_step(self, progress: Progress | None = None) -> bool:
        """One step of the listing pass; True when the pass is complete."""
        with self.d.reg.db.begin() as txn:
            cur = self._get_cursor(txn, "scan")
        page = await self.remote.list("", cur.decode() if cur else None,
                                      limit=self.cfg.pull_batch)
        added = 0
        with self.d.reg.db.begin(write=True) as txn:
            for st in page.entries:
                path = safe_key(st.key)
                if path is None or reserved(path) or not 0 <= st.size <= MAX_FILE_SIZE or \
                        self._lookup(txn, path) is not None:
                    continue
                status, made = self.d.reg.add_remote_file(
                    txn, path, st.size, st.mtime_ns or time.time_ns(), 0o644, None, self.idx,
                    path)
                if status == "added" and made is not None:
                    added += 1
                    self._invalidate(made, False)
            self._set_cursor(txn, "scan", page.cursor.encode() if page.cursor else None)
        if progress is not None:
            await progress({"listed": len(page.entries), "added": added})
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
    with d.reg.db.begin() as txn:
        return [json.loads(bytes(v)) for _k, v in txn.cursor(db=d.reg.db.db["conflicts"])]


async def cmd_problems(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Input from the mirrors that was quarantined (see :meth:`Sync._quarantine`)."""
    with d.reg.db.begin() as txn:
        out = [json.loads(bytes(v)) for _k, v in txn.cursor(db=d.reg.db.db["problems"])]
    return sorted(out, key=lambda p: p["time"])


def sync_stats(d: Daemon) -> dict[str, Any]:
    now = time.time()
    return {s.cfg.name: {"last_pull": s.state.last_pull or None,
                         "in_progress": s.state.in_progress,
                         "lag": (now - s.state.last_pull) if s.state.last_pull else None,
                         "applied": s.state.applied, "conflicts": s.state.conflicts,
                         "last_error": s.state.last_error}
            for s in getattr(d, "syncs", [])}

