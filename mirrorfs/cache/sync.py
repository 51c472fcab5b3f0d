"""The multi-node records (pull.py's side of LMDB): the outbox, the change feeds applied, the
conflict log and the quarantine.

Owns the ``outbox``, ``conflicts`` and ``problems`` records, and every registry change a pulled
record causes. pull.py decides what to fetch and when; each method here that changes something
is one write transaction, taken and committed without an await, and returns what the caller
must do after it (kernel invalidations, cache files to drop) instead of doing it inside: the
kernel and the content files are not LMDB's.

A record comes from another node through the mirror: :func:`changelog.parse_record` has
checked its fields before any of these run.
"""

from __future__ import annotations

import json
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import lmdb

from mirrorfs.cache import cursors
from mirrorfs.cache.db import (
    LOCAL_FULL,
    LOCAL_NONE,
    MQ,
    ROOT_INO,
    U16,
    U64,
    Database,
    Inode,
    RemoteCopy,
    bump_counter,
    get_counter,
    set_counter,
)
from mirrorfs.cache.registry import Registry


class Handles(Protocol):
    """What the records need to know of the open files (fs.py's table; none offline)."""

    def is_open(self, ino: int) -> bool: ...

    def is_writing(self, ino: int) -> bool:
        """A handle has written, or may write, bytes not committed yet."""
        ...


class NoHandles:
    """Offline: nothing is open."""

    def is_open(self, ino: int) -> bool:
        return False

    def is_writing(self, ino: int) -> bool:
        return False


def emit(txn: lmdb.Transaction, db: Database, mirror: int, rec: dict[str, Any]) -> None:
    """Add a change record to the outbox (called by the uploader in its completion txn)."""
    counters = db.db["counters"]
    seq = get_counter(txn, counters, b"m%d.outbox_seq" % mirror) + 1
    set_counter(txn, counters, b"m%d.outbox_seq" % mirror, seq)
    rec["seq"] = seq
    txn.put(MQ.pack(mirror, seq), json.dumps(rec).encode(), db=db.db["outbox"])


def conflicts(db: Database) -> list[dict[str, Any]]:
    with db.begin() as txn:
        return [json.loads(bytes(v)) for _k, v in txn.cursor(db=db.db["conflicts"])]


def problems(db: Database) -> list[dict[str, Any]]:
    with db.begin() as txn:
        return [json.loads(bytes(v)) for _k, v in txn.cursor(db=db.db["problems"])]


def remote_copy(rec: dict[str, Any], path: bytes, ver: int) -> RemoteCopy:
    """What the mirror holds at ``path`` after the record: the other node's object."""
    return RemoteCopy(path, ver, bytes.fromhex(rec["hash"]), int(rec["size"]),
                      stat.S_IFREG | int(rec.get("mode", 0o644)), int(rec["mtime"]))


@dataclass
class Outcome:
    """What a transaction here leaves the caller to do, after it committed."""

    #: (inode, content): drop the kernel's entry, and with ``content`` its pages too
    invalidate: list[tuple[Inode, bool]] = field(default_factory=list)
    #: inodes whose cache file is no longer theirs: detach open handles, remove the file
    dropped: list[int] = field(default_factory=list)
    #: why the record waits for a later round ("" : it does not)
    later: str = ""
    #: "", "blocked" (a file in the way of its directory), "not-a-file" (a directory there)
    refused: str = ""
    #: (local inode, its hash) when the record meets a local change of the same file
    conflict: tuple[Inode, bytes] | None = None


class SyncRecords:
    """The named operations of one mirror's pull (``idx``, keyed by its ``identity``)."""

    def __init__(self, reg: Registry, idx: int, identity: str, handles: Handles) -> None:
        self.reg = reg
        self.db = reg.db
        self.idx = idx
        self.identity = identity
        self.handles = handles

    # ------------------------------------------------------------ cursors

    def cursor_key(self, what: str) -> bytes:
        return f"pull:{self.identity}:{what}".encode()

    def node_done(self, node: str) -> int:
        """The last seq of ``node``'s feed applied here."""
        return cursors.get_seq(self.db, self.cursor_key("node:" + node))

    def advance(self, node: str, seq: int) -> None:
        cursors.advance(self.db, self.cursor_key("node:" + node), seq)

    def scan_position(self) -> str | None:
        v = cursors.get(self.db, self.cursor_key("scan"))
        return v.decode() if v else None

    # ------------------------------------------------------------ outbox

    def outbox_batch(self, most: int, most_bytes: int) -> list[tuple[bytes, bytes]]:
        """The oldest records to publish: at most ``most``, and ``most_bytes`` with newlines
        (at least one record)."""
        outbox = self.db.db["outbox"]
        prefix = U16.pack(self.idx)
        recs: list[tuple[bytes, bytes]] = []
        nbytes = 0
        with self.db.begin() as txn:
            cur = txn.cursor(db=outbox)
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:2] != prefix or len(recs) >= most or \
                            (recs and nbytes + len(v) + 1 > most_bytes):
                        break
                    recs.append((bytes(k), bytes(v)))
                    nbytes += len(v) + 1
        return recs

    def published(self, keys: list[bytes]) -> None:
        with self.db.begin(write=True) as txn:
            for k in keys:
                txn.delete(k, db=self.db.db["outbox"])

    # ------------------------------------------------------------ quarantine, conflicts

    def quarantine(self, key: str, line: int, entry: dict[str, Any]) -> bool:
        """Record input that failed its checks; False when it was recorded before."""
        pkey = f"pull:{self.identity}:{key}".encode() + b"\0" + U64.pack(line)
        problems_db = self.db.db["problems"]
        with self.db.begin(write=True) as txn:
            if txn.get(pkey, db=problems_db) is not None:
                return False
            txn.put(pkey, json.dumps(entry).encode(), db=problems_db)
            bump_counter(txn, self.reg.counters, b"quarantined", 1)
        return True

    def record_conflict(self, ino: int, entry: dict[str, Any]) -> None:
        with self.db.begin(write=True) as txn:
            txn.put(struct.pack(">d", time.time()) + U64.pack(ino),
                    json.dumps(entry).encode(), db=self.db.db["conflicts"])

    # ------------------------------------------------------------ reading

    def lookup(self, txn: lmdb.Transaction, path: bytes) -> Inode | None:
        node = self.reg.get_txn(txn, ROOT_INO)
        for part in path.split(b"/"):
            if node is None or not stat.S_ISDIR(node.mode):
                return None
            node = self.reg.lookup_txn(txn, node.ino, part)
        return node

    def entry(self, txn: lmdb.Transaction, path: bytes) -> tuple[int, bytes]:
        """The (directory inode, name) of the entry at ``path`` (which exists): a file with
        hard links has several, and a record is about this one."""
        head, _, name = path.rpartition(b"/")
        parent = self.lookup(txn, head) if head else self.reg.get_txn(txn, ROOT_INO)
        assert parent is not None
        return parent.ino, name

    @staticmethod
    def current_hash(node: Inode) -> bytes | None:
        if node.hash_ver == node.ver and node.hash_ver:
            return node.hash
        return None

    def dirty_here(self, txn: lmdb.Transaction, ino: int) -> bool:
        """This node changed the file and the mirror has not got that change yet: a journal
        job, or a handle that is writing it. With the kernel's writeback cache the writes of
        an open file may not even have reached us yet (they come at writeback or close), so
        a file opened for writing counts as changed until its last handle is released; its
        changes are then committed and journaled as any others. Offline there are no handles.
        """
        if self.reg.journal.get(txn, self.idx, ino) is not None:
            return True
        return self.handles.is_writing(ino)

    # ------------------------------------------------------------ applying a put

    def _store_chunks(self, txn: lmdb.Transaction, ino: int, ver: int,
                      rec: dict[str, Any]) -> None:
        if rec.get("chunks"):
            txn.put(U64.pack(ino), U64.pack(ver) + bytes.fromhex(rec["chunks"]),
                    db=self.reg.chunks)

    def _requeue_others(self, txn: lmdb.Transaction, ino: int, path: bytes) -> None:
        """This node's other mirrors lack the version just pulled: they get it from here."""
        for m in self.reg.mirrors:
            if m.index != self.idx and m.wants(path):
                self.reg.requeue(txn, ino, m.index)

    def _add(self, txn: lmdb.Transaction, rec: dict[str, Any], path: bytes,
             out: Outcome) -> str:
        """Register ``path`` as the other node's file (remote-only)."""
        status, made = self.reg.add_remote_file(
            txn, path, int(rec["size"]), int(rec["mtime"]), int(rec.get("mode", 0o644)),
            bytes.fromhex(rec["hash"]), self.idx, path)
        if made is not None and status == "added":
            self._store_chunks(txn, made.ino, made.ver, rec)
            self._requeue_others(txn, made.ino, path)
            out.invalidate.append((made, False))
        return status

    def apply_put(self, rec: dict[str, Any], path: bytes) -> Outcome:
        """Another node put a version of ``path``: take it, or say it conflicts."""
        reg = self.reg
        new_hash = bytes.fromhex(rec["hash"])
        prev = bytes.fromhex(rec["prev"]) if rec.get("prev") else None
        out = Outcome()
        with self.db.begin(write=True) as txn:
            node = self.lookup(txn, path)
            if node is None:
                if self._add(txn, rec, path, out) == "blocked":
                    out.refused = "blocked"
                return out
            if not stat.S_ISREG(node.mode):
                out.refused = "not-a-file"
                return out
            cur = self.current_hash(node)
            rc = reg.remote_copy(txn, self.idx, node.ino, path)
            if node.nlink > 1 and cur != new_hash and not self.dirty_here(txn, node.ino):
                # One of several names here: that path alone takes their version.
                self._split(txn, node, path, out)
                self._add(txn, rec, path, out)
                return out
            if cur == new_hash or (rc is not None and rc.hash == new_hash
                                   and not self.dirty_here(txn, node.ino)):
                # Already this version: at most the metadata changed.
                if (node.mode & 0o7777) != int(rec.get("mode", node.mode)) & 0o7777 \
                        or node.mtime_ns != int(rec["mtime"]):
                    node.mode = stat.S_IFREG | int(rec.get("mode", 0o644)) & 0o7777
                    node.mtime_ns = int(rec["mtime"])
                    txn.put(U64.pack(node.ino), node.pack(), db=reg.inodes)
                    out.invalidate.append((node, False))
                if rc is None or rc.hash != new_hash or rc.path != path:
                    reg.set_remote(txn, self.idx, node.ino, remote_copy(rec, path, node.ver))
                return out
            agreed = (prev is not None and (cur == prev or (rc is not None and rc.hash == prev)))
            if agreed and not self.dirty_here(txn, node.ino):
                self._fast_forward(txn, node, rec, path, out)
                return out
            out.conflict = (node, cur or (rc.hash if rc else b"\0" * 16))
        return out

    def _split(self, txn: lmdb.Transaction, node: Inode, path: bytes, out: Outcome) -> None:
        """``path`` is one of several names of ``node`` (hard links here) and takes another
        node's version: to the other nodes every path is a file of its own. The name leaves
        the inode, which keeps its other names and its content; the object at ``path`` is
        the other node's now, so our record of it goes without a remote delete. The caller
        then registers ``path`` as a new file."""
        self.reg.drop_remote(txn, self.idx, node.ino, path)
        self.reg.unlink_txn(txn, *self.entry(txn, path))
        out.invalidate.append((node, False))

    def _fast_forward(self, txn: lmdb.Transaction, node: Inode, rec: dict[str, Any],
                      path: bytes, out: Outcome) -> None:
        """The other node changed a file we had not: take its version (remote-only).

        A file open here gets a new inode (:meth:`Registry.supersede`) and the open one
        lives on as an orphan until its last release, its handles reading the old content:
        with the writeback cache the kernel never takes a new size from us for an inode it
        holds, so a fresh open of the same inode read the new content cut to the old size.
        A file not open is updated in place (the entry invalidation lets the kernel drop
        its inode). A file open here with a job in flight cannot get a new inode yet (see
        :meth:`Registry.supersede`), and updating it in place would cut the new content to
        the size the kernel holds: the record waits for a later round (``later``). The
        cache file of a file updated in place is the caller's to drop (``dropped``): readers
        keep the old file, new opens get the new one."""
        reg = self.reg
        superseded = False
        if self.handles.is_open(node.ino):
            new = reg.supersede(txn, node)
            if new is None:
                out.later = f"{path.decode('utf-8', 'surrogateescape')!r} is open here and " \
                    "a job of it is in flight"
                return
            node, superseded = new, True
        old_size = node.size
        if node.local == LOCAL_FULL:
            reg.set_local(txn, node, LOCAL_NONE)
            out.dropped.append(node.ino)
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
        reg.set_remote(txn, self.idx, node.ino, remote_copy(rec, path, node.ver))
        self._requeue_others(txn, node.ino, path)
        # The entry (the next lookup finds the new inode), and the pages of an inode updated
        # in place; a new inode has none yet.
        out.invalidate.append((node, not superseded))

    # ------------------------------------------------------------ conflicts

    def set_theirs_aside(self, rec: dict[str, Any], path: bytes, cname: bytes) -> Inode | None:
        """We win: register their version under the conflict name ``cname``, reading their
        object under the shared key ``path`` without owning it. None if ``cname`` exists."""
        reg = self.reg
        with self.db.begin(write=True) as txn:
            if self.lookup(txn, cname) is not None:
                return None
            _status, aside = reg.add_remote_file(
                txn, cname, int(rec["size"]), int(rec["mtime"]),
                int(rec.get("mode", 0o644)), bytes.fromhex(rec["hash"]), self.idx, path)
            if aside is not None:
                reg.drop_remote(txn, self.idx, aside.ino, path)
                txn.put(MQ.pack(self.idx, aside.ino),
                        remote_copy(rec, path, aside.ver).pack(), db=reg.remote)
                self._store_chunks(txn, aside.ino, aside.ver, rec)
            return aside

    def theirs_fetched(self, ino: int) -> None:
        """Their version is local under the conflict name (or could not be fetched): it
        forgets the shared key and, if local, goes to every mirror as a file of its own."""
        reg = self.reg
        with self.db.begin(write=True) as txn:
            txn.delete(MQ.pack(self.idx, ino), db=reg.remote)
            cur = reg.get_txn(txn, ino)
            if cur is not None and cur.local == LOCAL_FULL:
                reg.requeue(txn, ino, self.idx)
                for m in reg.mirrors:
                    if m.index != self.idx:
                        reg.requeue(txn, ino, m.index)

    def forget_shared(self, ino: int, path: bytes) -> tuple[int, bytes]:
        """They win: our object on the shared key is theirs now; forget it without deleting
        it. Returns the entry of ``path`` (to move our version aside)."""
        with self.db.begin(write=True) as txn:
            self.reg.drop_remote(txn, self.idx, ino, path)
            return self.entry(txn, path)

    def take_theirs(self, rec: dict[str, Any], path: bytes) -> Inode | None:
        """They win, our version moved aside: ``path`` becomes theirs (remote-only)."""
        with self.db.begin(write=True) as txn:
            _status, made = self.reg.add_remote_file(
                txn, path, int(rec["size"]), int(rec["mtime"]), int(rec.get("mode", 0o644)),
                bytes.fromhex(rec["hash"]), self.idx, path)
            if made is not None:
                self._store_chunks(txn, made.ino, made.ver, rec)
            return made

    # ------------------------------------------------------------ deletes, renames, listing

    def drop_copy(self, ino: int, path: bytes, requeue: bool) -> None:
        """The object at ``path`` is gone (or theirs) on this mirror: forget it, and with
        ``requeue`` upload ours again."""
        with self.db.begin(write=True) as txn:
            self.reg.drop_remote(txn, self.idx, ino, path)
            if requeue:
                self.reg.requeue(txn, ino, self.idx)

    def copy_moved(self, ino: int, src: bytes, dst: bytes) -> None:
        """The other node renamed the object: what we held at ``src`` is at ``dst`` now."""
        with self.db.begin(write=True) as txn:
            rc = self.reg.remote_copy(txn, self.idx, ino, src)
            if rc is not None:
                self.reg.set_remote(txn, self.idx, ino, RemoteCopy(
                    dst, rc.ver, rc.hash, rc.size, rc.mode, rc.mtime_ns))
                self.reg.drop_remote(txn, self.idx, ino, src)

    def add_listed(self, found: list[tuple[bytes, int, int]], position: str | None) -> list[Inode]:
        """One page of the listing pass: register each (path, size, mtime) not known here as
        a remote-only file, and move the scan position, in one transaction."""
        added = []
        with self.db.begin(write=True) as txn:
            for path, size, mtime_ns in found:
                if self.lookup(txn, path) is not None:
                    continue
                status, made = self.reg.add_remote_file(
                    txn, path, size, mtime_ns, 0o644, None, self.idx, path)
                if status == "added" and made is not None:
                    added.append(made)
            cursors.set_txn(txn, self.db, self.cursor_key("scan"),
                            position.encode() if position else None)
        return added
