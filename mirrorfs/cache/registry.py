"""Inodes, directory entries, attributes and xattrs, and the journal entries they cause.

Owns the namespace. Each public method that takes no transaction (mknode, setattr, rename,
unlink, commit_content...) is one short, synchronous LMDB write transaction that changes
metadata, touches the journal for every mirror that must hear of it, and updates the counters
-- all or nothing. Methods that take a ``txn`` (the ``*_txn`` readers, set_local, set_remote,
supersede, add_remote_file...) run inside a transaction of the caller's (the uploader, the
fetcher, pull, recovery), so that the caller's own records commit with them. Nothing here
awaits; callers in the trio thread call it inline.

Hard links: an inode may have several names (``nlink``); with more than one, every name is
in the ``links`` db and ``Inode.parent``/``name`` is one of them. Mirrors key objects by path,
so a linked file is one object per path there (see uploader.py); its content, chunk hashes and
cache file are the inode's, shared. Directories have one name (link(2) of one is EPERM).
Symlinks live in the registry only; mirrors do not get them.
renameat2's RENAME_NOREPLACE is supported; RENAME_EXCHANGE is not (EINVAL, as on filesystems
without it): swapping two paths would need two mirror renames through a temporary name.
"""

from __future__ import annotations

import errno
import fnmatch
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lmdb

from mirrorfs.cache.db import (
    F_OPEN_WRITE,
    F_ORPHAN,
    F_PINNED,
    JOB_CLAIMED,
    JOB_PENDING,
    LOCAL_FULL,
    LOCAL_NONE,
    MQ,
    ROOT_INO,
    U16,
    U64,
    ZERO_HASH,
    Database,
    Inode,
    RemoteCopy,
    bump_counter,
    get_counter,
)
from mirrorfs.cache.journal import Journal

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
NAME_MAX = 255
LINK_MAX = 65000  # names of one inode (ext4 allows 65000)
INO_BLOCK = 256  # inode numbers reserved per write of meta's next_ino (see _new_ino)


class FsError(OSError):
    """A POSIX error from a namespace operation (the registry's only exception)."""

    def __init__(self, err: int) -> None:
        super().__init__(err, errno.errorcode.get(err, str(err)))


@dataclass(frozen=True)
class MirrorRule:
    """Which paths a mirror takes, and how deletes reach it."""

    index: int
    name: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    delete_policy: str = "immediate"
    delete_delay: float = 0.0

    def wants(self, path: bytes) -> bool:
        if path == b".mirrorfs" or path.startswith(b".mirrorfs/"):
            return False  # reserved for mirrorfs's own objects (the multi-node change log)
        p = path.decode("utf-8", "surrogateescape")
        if self.include and not any(fnmatch.fnmatchcase(p, pat) for pat in self.include):
            return False
        return not any(fnmatch.fnmatchcase(p, pat) for pat in self.exclude)


CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux; named in 3.13


def now_ns() -> int:
    """File times come from the clock the kernel stamps writes with (``current_time()`` is the
    coarse clock): with the precise clock, a write just after a create got an older mtime."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


def dentry_key(parent: int, name: bytes) -> bytes:
    return U64.pack(parent) + name


class Registry:
    def __init__(self, db: Database, mirrors: list[MirrorRule], upload_delay: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.journal = Journal(db)
        self.mirrors = mirrors
        self.upload_delay = upload_delay
        self.clock = clock
        self.inodes = db.db["inodes"]
        self.dentries = db.db["dentries"]
        self.xattrs = db.db["xattrs"]
        self.counters = db.db["counters"]
        self.remote = db.db["remote"]
        self.chunks = db.db["chunks"]
        self.links = db.db["links"]
        self.is_open: Callable[[int], bool] = lambda ino: False
        self._ino_next: int | None = None  # see _new_ino
        #: an entry made behind the kernel's back (import, pull's new files): the mount makes
        #: the kernel forget what it cached of that name (a negative entry, the directory's
        #: attributes), which it may otherwise keep for ``attr_timeout`` (fs.Operations)
        self.entry_added: Callable[[int, bytes], None] = lambda parent, name: None
        self._ensure_root()

    # ----------------------------------------------------------------- reading

    def _ensure_root(self) -> None:
        with self.db.begin(write=True) as txn:
            if txn.get(U64.pack(ROOT_INO), db=self.inodes) is None:
                now = now_ns()
                root = Inode(ROOT_INO, ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2, 0, now, now, now)
                txn.put(U64.pack(ROOT_INO), root.pack(), db=self.inodes)
                bump_counter(txn, self.counters, b"dirs", 1)

    def get_txn(self, txn: lmdb.Transaction, ino: int) -> Inode | None:
        v = txn.get(U64.pack(ino), db=self.inodes)
        return Inode.unpack(v) if v else None

    def get(self, ino: int) -> Inode | None:
        with self.db.begin() as txn:
            return self.get_txn(txn, ino)

    def _must(self, txn: lmdb.Transaction, ino: int) -> Inode:
        node = self.get_txn(txn, ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def lookup_txn(self, txn: lmdb.Transaction, parent: int, name: bytes) -> Inode | None:
        v = txn.get(dentry_key(parent, name), db=self.dentries)
        return self.get_txn(txn, U64.unpack(v)[0]) if v else None

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        with self.db.begin() as txn:
            return self.lookup_txn(txn, parent, name)

    def children_txn(self, txn: lmdb.Transaction, ino: int) -> Iterator[tuple[bytes, int]]:
        prefix = U64.pack(ino)
        cur = txn.cursor(db=self.dentries)
        if not cur.set_range(prefix):
            return
        for key, val in cur:
            if key[:8] != prefix:
                break
            yield bytes(key[8:]), U64.unpack(val)[0]

    def list_dir(self, ino: int) -> list[tuple[bytes, int]]:
        with self.db.begin() as txn:
            return list(self.children_txn(txn, ino))

    def path_txn(self, txn: lmdb.Transaction, node: Inode) -> bytes:
        """The path under the mount, as the mirrors key it (no leading slash). For an inode
        with hard links: its primary name's (:meth:`paths_txn` gives them all)."""
        return self.path_at(txn, node.parent, node.name)

    def names_txn(self, txn: lmdb.Transaction, node: Inode) -> list[tuple[int, bytes]]:
        """Every (parent, name) of ``node``: none for an unlinked one."""
        if node.nlink == 0 or node.flags & F_ORPHAN:
            return []
        if node.nlink == 1 or stat.S_ISDIR(node.mode):
            return [(node.parent, node.name)]
        key = U64.pack(node.ino)
        out = []
        cur = txn.cursor(db=self.links)
        if cur.set_range(key):
            for k in cur.iternext(keys=True, values=False):
                if k[:8] != key:
                    break
                out.append((U64.unpack(k[8:16])[0], bytes(k[16:])))
        return out

    def paths_txn(self, txn: lmdb.Transaction, node: Inode) -> list[bytes]:
        """Every path of ``node`` (one per hard link), primary first; none if unlinked."""
        paths = [self.path_at(txn, p, n) for p, n in self.names_txn(txn, node)]
        if len(paths) < 2:
            return paths
        primary = self.path_txn(txn, node)
        if primary in paths:
            paths.remove(primary)
            paths.insert(0, primary)
        return paths

    def path_at(self, txn: lmdb.Transaction, parent: int, name: bytes) -> bytes:
        """The path of entry ``name`` in directory ``parent``."""
        parts = [name]
        while parent != ROOT_INO:
            p = self.get_txn(txn, parent)
            if p is None:
                break
            parts.append(p.name)
            parent = p.parent
        return b"/".join(reversed(parts))

    def path_of(self, ino: int) -> bytes:
        with self.db.begin() as txn:
            node = self.get_txn(txn, ino)
            return self.path_txn(txn, node) if node and ino != ROOT_INO else b""

    def counter(self, name: bytes) -> int:
        with self.db.begin() as txn:
            return get_counter(txn, self.counters, name)

    def is_dirty_txn(self, txn: lmdb.Transaction, ino: int) -> bool:
        return self.journal.has_jobs(txn, [m.index for m in self.mirrors], ino)

    def _copy_records(self, txn: lmdb.Transaction, mirror: int,
                      ino: int) -> list[tuple[bytes, RemoteCopy]]:
        prefix = MQ.pack(mirror, ino)
        out = []
        cur = txn.cursor(db=self.remote)
        if cur.set_range(prefix):
            for k, v in cur:
                if k[:10] != prefix:
                    break
                out.append((bytes(k), RemoteCopy.unpack(v)))
        return out

    def remote_copies(self, txn: lmdb.Transaction, mirror: int, ino: int) -> list[RemoteCopy]:
        """Every object ``mirror`` holds for ``ino`` (one per key; several for hard links)."""
        return [rc for _k, rc in self._copy_records(txn, mirror, ino)]

    def remote_copy(self, txn: lmdb.Transaction, mirror: int, ino: int,
                    path: bytes | None = None) -> RemoteCopy | None:
        """The object at ``path``; without a path, any one holding the newest version (what
        a reader needs: every path of an inode has its content)."""
        copies = self.remote_copies(txn, mirror, ino)
        if path is not None:
            return next((rc for rc in copies if rc.path == path), None)
        return max(copies, key=lambda rc: rc.ver, default=None)

    def has_copy(self, txn: lmdb.Transaction, mirror: int, ino: int) -> bool:
        cur = txn.cursor(db=self.remote)
        prefix = MQ.pack(mirror, ino)
        return cur.set_range(prefix) and cur.key()[:10] == prefix

    # ----------------------------------------------------------------- journaling

    def _put(self, txn: lmdb.Transaction, node: Inode) -> None:
        txn.put(U64.pack(node.ino), node.pack(), db=self.inodes)

    def _journal(self, txn: lmdb.Transaction, node: Inode, delete: bool = False) -> None:
        """Tell every mirror that must hear of it that ``node`` changed (at any of its
        paths: a mirror that wants one of them, or holds or is working on any)."""
        if not stat.S_ISREG(node.mode):
            return  # symlinks, FIFOs, devices live in the registry only
        paths = self.paths_txn(txn, node)
        was_dirty = self.is_dirty_txn(txn, node.ino)
        now = self.clock()
        touched = False
        for m in self.mirrors:
            wanted = any(m.wants(p) for p in paths)
            known = (self.has_copy(txn, m.index, node.ino)
                     or self.journal.get(txn, m.index, node.ino) is not None)
            if not (wanted or known):
                continue
            delay = self.upload_delay
            if delete and m.delete_policy == "delayed":
                delay = max(delay, m.delete_delay)
            self.journal.touch(txn, m.index, node.ino, now + delay)
            touched = True
        if touched and not was_dirty and not node.flags & F_ORPHAN:
            bump_counter(txn, self.counters, b"dirty_files", 1)
            bump_counter(txn, self.counters, b"dirty_bytes", node.size)

    def journal_subtree(self, txn: lmdb.Transaction, node: Inode) -> None:
        """A directory moved: every file below it has a new path on the mirrors."""
        stack = [node]
        while stack:
            d = stack.pop()
            for _name, child_ino in self.children_txn(txn, d.ino):
                child = self.get_txn(txn, child_ino)
                if child is None:
                    continue
                if stat.S_ISDIR(child.mode):
                    stack.append(child)
                else:
                    self._journal(txn, child)

    def touch_all(self, txn: lmdb.Transaction, mirror: MirrorRule, due: float,
                  batch_after: int = 0, limit: int = 0) -> tuple[int, int]:
        """Queue every live file for one mirror (backfill); returns (queued, last ino seen)."""
        cur = txn.cursor(db=self.inodes)
        queued = last = 0
        if not cur.set_range(U64.pack(batch_after + 1)):
            return 0, 0
        for key, val in cur:
            node = Inode.unpack(val)
            last = U64.unpack(key)[0]
            if stat.S_ISREG(node.mode) and not node.flags & F_ORPHAN:
                if any(mirror.wants(p) for p in self.paths_txn(txn, node)):
                    was_dirty = self.is_dirty_txn(txn, node.ino)
                    self.journal.touch(txn, mirror.index, node.ino, due)
                    if not was_dirty:
                        bump_counter(txn, self.counters, b"dirty_files", 1)
                        bump_counter(txn, self.counters, b"dirty_bytes", node.size)
                    queued += 1
            if limit and last - batch_after >= limit:
                break
        return queued, last

    def requeue(self, txn: lmdb.Transaction, ino: int, mirror: int) -> None:
        """Queue (mirror, ino) now, e.g. after `verify` found its copy missing or bad."""
        node = self.get_txn(txn, ino)
        if node is None:
            return
        was_dirty = self.is_dirty_txn(txn, ino)
        self.journal.touch(txn, mirror, ino, self.clock())
        if not was_dirty and not node.flags & F_ORPHAN:
            bump_counter(txn, self.counters, b"dirty_files", 1)
            bump_counter(txn, self.counters, b"dirty_bytes", node.size)

    def job_done(self, txn: lmdb.Transaction, mirror: int, ino: int, seq: int) -> None:
        """The uploader reconciled (mirror, ino): drop the job and settle the counters."""
        if not self.journal.complete(txn, mirror, ino, seq):
            return
        node = self.get_txn(txn, ino)
        if node is None or self.is_dirty_txn(txn, ino):
            return
        if node.flags & F_ORPHAN:
            if not self._has_remote(txn, ino) and not self.is_open(ino):
                self._delete_record(txn, node)
            return
        bump_counter(txn, self.counters, b"dirty_files", -1)
        bump_counter(txn, self.counters, b"dirty_bytes", -node.size)

    def _has_remote(self, txn: lmdb.Transaction, ino: int) -> bool:
        return any(self.has_copy(txn, m.index, ino) for m in self.mirrors)

    # ----------------------------------------------------------------- changing

    def _new_ino(self, txn: lmdb.Transaction) -> int:
        """A fresh inode number. The persisted ``next_ino`` is moved INO_BLOCK ahead at a
        time and the numbers below it handed out from memory, so that a create dirties no
        page of ``meta`` (an LMDB page write per sub-database a commit touches). Every number
        handed out is below the persisted one; after a restart the rest of a block is skipped.
        A block reserved in a transaction that aborted is noticed at the next call (memory
        ahead of the persisted value) and reserved again."""
        meta = self.db.db["meta"]
        v = txn.get(b"next_ino", db=meta)
        if v is None:  # written when the database is made (db.open): never missing
            raise RuntimeError("LMDB meta has no next_ino: the cache database is damaged")
        limit: int = U64.unpack(v)[0]
        if self._ino_next is None or not limit - INO_BLOCK <= self._ino_next < limit:
            self._ino_next = limit
            txn.put(b"next_ino", U64.pack(limit + INO_BLOCK), db=meta)
        ino = self._ino_next
        self._ino_next += 1
        return ino

    def _dir_for_change(self, txn: lmdb.Transaction, parent: int) -> Inode:
        d = self._must(txn, parent)
        if not stat.S_ISDIR(d.mode):
            raise FsError(errno.ENOTDIR)
        return d

    def mknode(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               rdev: int = 0, target: bytes = b"", opened: bool = False,
               content: Callable[[int], int] | None = None) -> Inode:
        """Create an entry. ``opened``: a regular file created by create(2), open for writing;
        it is journaled when its handle first commits (one transaction less per new file).

        ``content(ino)`` makes the content file inside the transaction (if it raises, nothing
        is created) and returns its ctime, which stamps the new inode. Why: the kernel stamps
        the first write with its own clock, which on multigrain-timestamp kernels (6.13+) is
        the coarse clock raised to the last fine-grained time it handed out; a time that
        differs makes it send a SETATTR of the times at close (one more transaction per file,
        measured on ~all small files). The cache file's ctime is that very clock reading."""
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        now = now_ns()
        with self.db.begin(write=True) as txn:
            d = self._dir_for_change(txn, parent)
            if txn.get(dentry_key(parent, name), db=self.dentries) is not None:
                raise FsError(errno.EEXIST)
            if d.mode & stat.S_ISGID:
                gid = d.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            ino = self._new_ino(txn)
            if content is not None:
                # never older than our clock (a cache file system with coarse timestamps)
                now = max(now, content(ino))
            is_dir = stat.S_ISDIR(mode)
            size = len(target) if stat.S_ISLNK(mode) else 0
            node = Inode(ino, parent, mode, uid, gid, 2 if is_dir else 1, size, now, now, now,
                         rdev=rdev, ver=1, local=LOCAL_FULL, name=name, target=target,
                         flags=F_OPEN_WRITE if opened else 0)
            self._put(txn, node)
            txn.put(dentry_key(parent, name), U64.pack(ino), db=self.dentries)
            d.mtime_ns = d.ctime_ns = now
            if is_dir:
                d.nlink += 1
                bump_counter(txn, self.counters, b"dirs", 1)
            elif stat.S_ISLNK(mode):
                bump_counter(txn, self.counters, b"symlinks", 1)
            else:
                bump_counter(txn, self.counters, b"files", 1)
                bump_counter(txn, self.counters, b"local_files", 1)
                if not opened:
                    self._journal(txn, node)
            self._put(txn, d)
        return node

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> Inode:
        now = now_ns()
        with self.db.begin(write=True) as txn:
            node = self._must(txn, ino)
            old_size = node.size
            journal = False
            if mode is not None:
                node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
                journal = True
            if uid is not None:
                node.uid = uid
            if gid is not None:
                node.gid = gid
            if size is not None and size != node.size:
                node.size = size
                node.ver += 1
                node.mtime_ns = now
                journal = True
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None and mtime_ns != node.mtime_ns:
                node.mtime_ns = mtime_ns
                journal = True
            node.ctime_ns = ctime_ns if ctime_ns is not None else now
            self.account_size(txn, node, old_size)
            self._put(txn, node)
            if journal and stat.S_ISREG(node.mode):
                self._journal(txn, node)
        return node

    def account_size(self, txn: lmdb.Transaction, node: Inode, old_size: int) -> None:
        delta = node.size - old_size
        if not delta or not stat.S_ISREG(node.mode) or node.flags & F_ORPHAN:
            return
        bump_counter(txn, self.counters, b"bytes", delta)
        if node.local == LOCAL_FULL:
            bump_counter(txn, self.counters, b"local_bytes", delta)
        if self.is_dirty_txn(txn, node.ino):
            bump_counter(txn, self.counters, b"dirty_bytes", delta)

    def mark_open_write(self, ino: int) -> None:
        """First write since the last commit: if we crash now, startup re-reads the size."""
        with self.db.begin(write=True) as txn:
            node = self._must(txn, ino)
            if not node.flags & F_OPEN_WRITE:
                node.flags |= F_OPEN_WRITE
                self._put(txn, node)

    def commit_content(self, ino: int, size: int, mtime_ns: int | None = None,
                       times: dict[str, int] | None = None) -> Inode:
        """Content written through a handle reached the cache file: new version, journal it.

        ``times``: atime_ns/mtime_ns/ctime_ns the kernel set on the open file since the last
        commit (kept in memory until now, see fs.setattr), applied in the same transaction.
        """
        with self.db.begin(write=True) as txn:
            node = self._must(txn, ino)
            old_size = node.size
            node.size = size
            node.ver += 1
            node.flags &= ~F_OPEN_WRITE
            # With the kernel's writeback cache the kernel owns mtime and ctime and has already
            # sent them in a setattr before this flush: mtime_ns=None keeps those values (a
            # new ctime here would show up as a change after the kernel forgets the inode).
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
                node.ctime_ns = now_ns()
            for name, value in (times or {}).items():
                setattr(node, name, value)
            self.account_size(txn, node, old_size)
            self._put(txn, node)
            self._journal(txn, node)
        return node

    def set_local(self, txn: lmdb.Transaction, node: Inode, local: int) -> None:
        if node.local == local:
            return
        sign = 1 if local == LOCAL_FULL else -1
        if not node.flags & F_ORPHAN:
            bump_counter(txn, self.counters, b"local_files", sign)
            bump_counter(txn, self.counters, b"local_bytes", sign * node.size)
        node.local = local
        self._put(txn, node)

    def make_local(self, ino: int) -> None:
        """A remote-only file is about to be emptied (O_TRUNC, truncate to 0) and its caller
        has made an empty content file: the file is local from now on."""
        with self.db.begin(write=True) as txn:
            node = self.get_txn(txn, ino)
            if node is not None and node.local != LOCAL_FULL:
                self.set_local(txn, node, LOCAL_FULL)

    def drop_local(self, ino: int, evictable: Callable[[lmdb.Transaction, Inode], bool],
                   force_pinned: bool = False) -> tuple[Inode | None, bool]:
        """Evict: make a local file remote-only if ``evictable`` says so (in the same
        transaction). Returns (the inode or None, whether it was made remote-only); the
        caller removes the content file after this commit (a crash in between leaves a
        stray file, which the startup check removes)."""
        with self.db.begin(write=True) as txn:
            node = self.get_txn(txn, ino)
            if node is None or node.local != LOCAL_FULL:
                return None, False
            if force_pinned and node.flags & F_PINNED:
                node.flags &= ~F_PINNED
            if not evictable(txn, node):
                return node, False
            self.set_local(txn, node, LOCAL_NONE)
        return node, True

    def _unlink_txn(self, txn: lmdb.Transaction, parent: Inode, name: bytes,
                    node: Inode, now: int) -> bool:
        """Remove the entry; return True if the content file can be deleted now."""
        txn.delete(dentry_key(parent.ino, name), db=self.dentries)
        parent.mtime_ns = parent.ctime_ns = now
        if not stat.S_ISDIR(node.mode) and node.nlink > 1:
            # One of several names: the inode and its other names stay; the mirrors drop
            # the object at this path (and only that one).
            self._put(txn, parent)
            self._drop_name(txn, node, parent.ino, name)
            node.ctime_ns = now
            self._put(txn, node)
            self._journal(txn, node, delete=True)
            return False
        if stat.S_ISDIR(node.mode):
            parent.nlink -= 1
            self._put(txn, parent)
            self._delete_record(txn, node)
            bump_counter(txn, self.counters, b"dirs", -1)
            return False
        self._put(txn, parent)
        if stat.S_ISLNK(node.mode):
            self._delete_record(txn, node)
            bump_counter(txn, self.counters, b"symlinks", -1)
            return False
        was_dirty = self.is_dirty_txn(txn, node.ino)
        bump_counter(txn, self.counters, b"files", -1)
        bump_counter(txn, self.counters, b"bytes", -node.size)
        if was_dirty:
            bump_counter(txn, self.counters, b"dirty_files", -1)
            bump_counter(txn, self.counters, b"dirty_bytes", -node.size)
        self._orphan(txn, node, now)
        # A mirror that never got the file needs to hear nothing: created and deleted inside
        # the cool-down costs no remote operation and leaves no job. (A job in flight stays:
        # its upload may land, and the delete must follow it; so does a job with an
        # unfinished step, e.g. an upload cut by a crash, whose object may be there.)
        for m in self.mirrors:
            job = self.journal.get(txn, m.index, node.ino)
            if (job is not None and job.state != JOB_CLAIMED
                    and not self.has_copy(txn, m.index, node.ino)
                    and not self.has_pending(txn, m.index, node.ino)):
                self.journal.drop(txn, m.index, node.ino)
        self._journal(txn, node, delete=True)
        if not self.is_open(node.ino):
            if not self._has_remote(txn, node.ino) and not self.is_dirty_txn(txn, node.ino):
                self._delete_record(txn, node)
            return True
        return False

    def _delete_record(self, txn: lmdb.Transaction, node: Inode) -> None:
        key = U64.pack(node.ino)
        txn.delete(key, db=self.inodes)
        txn.delete(key, db=self.chunks)
        cur = txn.cursor(db=self.xattrs)
        while cur.set_range(key) and cur.key()[:8] == key:
            cur.delete()

    def unlink(self, parent: int, name: bytes, want_dir: bool) -> tuple[Inode, bool]:
        """unlink(2)/rmdir(2). Returns the inode and whether its content file may go now."""
        with self.db.begin(write=True) as txn:
            return self.unlink_txn(txn, parent, name, want_dir)

    def unlink_txn(self, txn: lmdb.Transaction, parent: int, name: bytes,
                   want_dir: bool = False) -> tuple[Inode, bool]:
        """:meth:`unlink` inside the caller's transaction."""
        now = now_ns()
        d = self._dir_for_change(txn, parent)
        node = self.lookup_txn(txn, parent, name)
        if node is None:
            raise FsError(errno.ENOENT)
        is_dir = stat.S_ISDIR(node.mode)
        if want_dir and not is_dir:
            raise FsError(errno.ENOTDIR)
        if not want_dir and is_dir:
            raise FsError(errno.EISDIR)
        if is_dir and next(self.children_txn(txn, node.ino), None) is not None:
            raise FsError(errno.ENOTEMPTY)
        gone = self._unlink_txn(txn, d, name, node, now)
        return node, gone

    def supersede(self, txn: lmdb.Transaction, old: Inode) -> Inode | None:
        """Give the path of the regular file ``old`` a new inode and make ``old`` an orphan,
        as a local file system does when a file open somewhere is replaced: a pull that takes
        another node's version of a file open here (pull.py; the kernel keeps the size of an
        inode it holds, so the new version needs another inode).

        The new inode has ``old``'s attributes, xattrs and version, and no content yet
        (remote-only): the caller gives it the new version. Every mirror's record of
        ``old`` -- its remote copy, the key it owns, its job -- moves to the new inode, so
        the orphan owns nothing on any mirror: no job of it will ever delete or rename the
        object under its old key, and its record goes at its last release. Counters: the
        file is still counted once, the orphan's content no longer counts as cached.

        Returns None, changing nothing, while a job of ``old`` is in flight: its completion
        would record a copy for ``old`` again. The caller then tries again later.
        """
        if any((job := self.journal.get(txn, m.index, old.ino)) is not None
               and job.state == JOB_CLAIMED for m in self.mirrors):
            return None
        now = now_ns()
        new = old.copy(ino=self._new_ino(txn), local=LOCAL_NONE, flags=old.flags & F_PINNED,
                       ctime_ns=now)
        self._put(txn, new)
        txn.put(dentry_key(old.parent, old.name), U64.pack(new.ino), db=self.dentries)
        key = U64.pack(old.ino)
        xattrs = []
        cur = txn.cursor(db=self.xattrs)
        if cur.set_range(key):
            for k, v in cur:
                if k[:8] != key:
                    break
                xattrs.append((U64.pack(new.ino) + k[8:], bytes(v)))
        for k, v in xattrs:
            txn.put(k, v, db=self.xattrs)
        for m in self.mirrors:
            # (the copies counters stay: the same copies, another owner)
            for k, rc in self._copy_records(txn, m.index, old.ino):
                txn.delete(k, db=self.remote)
                txn.put(MQ.pack(m.index, new.ino) + rc.path, rc.pack(), db=self.remote)
                if self.rpath_owner(txn, m.index, rc.path) == old.ino:
                    txn.put(U16.pack(m.index) + rc.path, U64.pack(new.ino),
                            db=self.db.db["rpath"])
            self._move_pending(txn, m.index, old.ino, new.ino)
            job = self.journal.get(txn, m.index, old.ino)
            if job is not None:  # pending (keeps its due time) or failed (runs again)
                self.journal.drop(txn, m.index, old.ino)
                self.journal.touch(txn, m.index, new.ino,
                                   job.due if job.state == JOB_PENDING else self.clock())
        # dirty_files/bytes: the jobs moved with the same size; files/bytes: one file still
        self._orphan(txn, old, now)
        return new

    def _orphan(self, txn: lmdb.Transaction, node: Inode, now: int) -> None:
        """``node`` has no name any more; its record stays until its last handle goes, and
        its content (if cached) no longer counts as cached."""
        if node.local == LOCAL_FULL:
            bump_counter(txn, self.counters, b"local_files", -1)
            bump_counter(txn, self.counters, b"local_bytes", -node.size)
        node.nlink = 0
        node.flags |= F_ORPHAN
        node.ctime_ns = now
        self._put(txn, node)

    def release_orphan(self, ino: int) -> bool:
        """The last handle of an unlinked file closed. Returns True if content may go."""
        with self.db.begin(write=True) as txn:
            node = self.get_txn(txn, ino)
            if node is None:
                return True
            if not node.flags & F_ORPHAN:
                return False
            if not self._has_remote(txn, ino) and not self.is_dirty_txn(txn, ino):
                self._delete_record(txn, node)
            return True

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes,
               flags: int) -> tuple[Inode, Inode | None, bool]:
        """rename(2). Returns (moved inode, replaced inode, replaced content may go now)."""
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        if len(n_new) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        now = now_ns()
        with self.db.begin(write=True) as txn:
            d_old = self._dir_for_change(txn, p_old)
            d_new = d_old if p_new == p_old else self._dir_for_change(txn, p_new)
            node = self.lookup_txn(txn, p_old, n_old)
            if node is None:
                raise FsError(errno.ENOENT)
            is_dir = stat.S_ISDIR(node.mode)
            if is_dir:
                anc = d_new
                while True:
                    if anc.ino == node.ino:
                        raise FsError(errno.EINVAL)
                    if anc.ino == ROOT_INO:
                        break
                    anc = self._must(txn, anc.parent)
            target = self.lookup_txn(txn, p_new, n_new)
            replaced_gone = False
            if target is not None:
                if target.ino == node.ino:
                    return node, None, False
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                t_dir = stat.S_ISDIR(target.mode)
                if t_dir and not is_dir:
                    raise FsError(errno.EISDIR)
                if is_dir and not t_dir:
                    raise FsError(errno.ENOTDIR)
                if t_dir and next(self.children_txn(txn, target.ino), None) is not None:
                    raise FsError(errno.ENOTEMPTY)
                replaced_gone = self._unlink_txn(txn, d_new, n_new, target, now)
                if d_new.ino == d_old.ino:
                    d_old = d_new
            txn.delete(dentry_key(p_old, n_old), db=self.dentries)
            txn.put(dentry_key(p_new, n_new), U64.pack(node.ino), db=self.dentries)
            if not is_dir and node.nlink > 1:  # one of its names moves; the others stay
                txn.delete(self._link_key(node.ino, p_old, n_old), db=self.links)
                txn.put(self._link_key(node.ino, p_new, n_new), b"", db=self.links)
                if (node.parent, node.name) == (p_old, n_old):
                    node.parent, node.name = p_new, n_new
            else:
                node.parent = p_new
                node.name = n_new
            node.ctime_ns = now
            self._put(txn, node)
            d_old.mtime_ns = d_old.ctime_ns = now
            d_new.mtime_ns = d_new.ctime_ns = now
            if is_dir and d_old.ino != d_new.ino:
                d_old.nlink -= 1
                d_new.nlink += 1
            self._put(txn, d_old)
            if d_new is not d_old:
                self._put(txn, d_new)
            if is_dir:
                self.journal_subtree(txn, node)
            else:
                self._journal(txn, node)
        return node, target, replaced_gone

    # ----------------------------------------------------------------- hard links

    @staticmethod
    def _link_key(ino: int, parent: int, name: bytes) -> bytes:
        return U64.pack(ino) + U64.pack(parent) + name

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        """link(2): another name for ``ino``. On the mirrors the new path becomes an object
        of its own with the inode's content (journaled like any change of the inode)."""
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        now = now_ns()
        with self.db.begin(write=True) as txn:
            d = self._dir_for_change(txn, parent)
            node = self._must(txn, ino)
            if stat.S_ISDIR(node.mode):
                raise FsError(errno.EPERM)
            if node.nlink == 0 or node.flags & F_ORPHAN:
                raise FsError(errno.ENOENT)  # linkat of an unlinked open file (no AT_EMPTY_PATH)
            if txn.get(dentry_key(parent, name), db=self.dentries) is not None:
                raise FsError(errno.EEXIST)
            if node.nlink >= LINK_MAX:
                raise FsError(errno.EMLINK)
            if node.nlink == 1:
                txn.put(self._link_key(ino, node.parent, node.name), b"", db=self.links)
            txn.put(self._link_key(ino, parent, name), b"", db=self.links)
            txn.put(dentry_key(parent, name), U64.pack(ino), db=self.dentries)
            node.nlink += 1
            node.ctime_ns = now
            self._put(txn, node)
            d.mtime_ns = d.ctime_ns = now
            self._put(txn, d)
            self._journal(txn, node)
        return node

    def _drop_name(self, txn: lmdb.Transaction, node: Inode, parent: int, name: bytes) -> None:
        """``node`` (nlink > 1) loses the name ``name`` in ``parent``; the caller puts it."""
        txn.delete(self._link_key(node.ino, parent, name), db=self.links)
        node.nlink -= 1
        rest = self.names_txn(txn, node.copy(nlink=2))  # what the links db still holds
        if (node.parent, node.name) == (parent, name) and rest:
            node.parent, node.name = rest[0]
        if node.nlink == 1:  # one name again: it lives in the inode alone
            for p, n in rest:
                txn.delete(self._link_key(node.ino, p, n), db=self.links)

    # ----------------------------------------------------------------- xattrs

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        with self.db.begin() as txn:
            v = txn.get(U64.pack(ino) + name, db=self.xattrs)
            return bytes(v) if v is not None else None

    def listxattr(self, ino: int) -> list[bytes]:
        key = U64.pack(ino)
        out = []
        with self.db.begin() as txn:
            cur = txn.cursor(db=self.xattrs)
            if cur.set_range(key):
                for k in cur.iternext(keys=True, values=False):
                    if k[:8] != key:
                        break
                    out.append(bytes(k[8:]))
        return out

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        with self.db.begin(write=True) as txn:
            node = self._must(txn, ino)
            txn.put(U64.pack(ino) + name, value, db=self.xattrs)
            node.ctime_ns = now_ns()
            self._put(txn, node)

    def removexattr(self, ino: int, name: bytes) -> None:
        with self.db.begin(write=True) as txn:
            node = self._must(txn, ino)
            if not txn.delete(U64.pack(ino) + name, db=self.xattrs):
                raise FsError(errno.ENODATA)
            node.ctime_ns = now_ns()
            self._put(txn, node)

    # ----------------------------------------------------------------- mirrors

    def mirror_index(self, name: str) -> int:
        """Stable small integer for a mirror name (kept in LMDB across config edits)."""
        mdb = self.db.db["mirrors"]
        with self.db.begin(write=True) as txn:
            v = txn.get(name.encode(), db=mdb)
            if v is not None:
                return U16.unpack(v)[0]
            used = {U16.unpack(val)[0] for _k, val in txn.cursor(db=mdb)}
            idx = next(i for i in range(1, 65535) if i not in used)
            txn.put(name.encode(), U16.pack(idx), db=mdb)
            return idx

    # ----------------------------------------------------------------- remote copies

    def rpath_owner(self, txn: lmdb.Transaction, mirror: int, path: bytes) -> int | None:
        v = txn.get(U16.pack(mirror) + path, db=self.db.db["rpath"])
        return U64.unpack(v)[0] if v else None

    def drop_remote(self, txn: lmdb.Transaction, mirror: int, ino: int, path: bytes,
                    owned: bool = True) -> None:
        """Forget the object ``mirror`` holds for ``ino`` at ``path`` (and the key, if
        ``ino`` still owns it and ``owned``)."""
        for k, rc in self._copy_records(txn, mirror, ino):
            if rc.path == path:
                txn.delete(k, db=self.remote)
                bump_counter(txn, self.counters, b"m%d.copies" % mirror, -1)
                bump_counter(txn, self.counters, b"m%d.copy_bytes" % mirror, -rc.size)
        if owned and self.rpath_owner(txn, mirror, path) == ino:
            txn.delete(U16.pack(mirror) + path, db=self.db.db["rpath"])

    # Unfinished multi-step remote operations of an inode's job (the ``pending`` db).

    def pending_ops(self, txn: lmdb.Transaction, mirror: int,
                    ino: int) -> list[tuple[bytes, bytes, bytes]]:
        """(key, kind, hash) of every unfinished step of (mirror, ino), in key order."""
        prefix = MQ.pack(mirror, ino)
        out = []
        cur = txn.cursor(db=self.db.db["pending"])
        if cur.set_range(prefix):
            for k, v in cur:
                if k[:MQ.size] != prefix:
                    break
                out.append((bytes(k[MQ.size:]), bytes(v[:1]), bytes(v[1:17])))
        return out

    def has_pending(self, txn: lmdb.Transaction, mirror: int, ino: int) -> bool:
        prefix = MQ.pack(mirror, ino)
        cur = txn.cursor(db=self.db.db["pending"])
        return bool(cur.set_range(prefix)) and cur.key()[:MQ.size] == prefix

    def set_pending(self, txn: lmdb.Transaction, mirror: int, ino: int, key: bytes,
                    kind: bytes, digest: bytes = ZERO_HASH) -> None:
        txn.put(MQ.pack(mirror, ino) + key, kind + digest, db=self.db.db["pending"])

    def clear_pending(self, txn: lmdb.Transaction, mirror: int, ino: int, key: bytes) -> None:
        txn.delete(MQ.pack(mirror, ino) + key, db=self.db.db["pending"])

    def _move_pending(self, txn: lmdb.Transaction, mirror: int, old: int, new: int) -> None:
        for key, kind, digest in self.pending_ops(txn, mirror, old):
            self.clear_pending(txn, mirror, old, key)
            self.set_pending(txn, mirror, new, key, kind, digest)

    def set_remote(self, txn: lmdb.Transaction, mirror: int, ino: int, rc: RemoteCopy) -> None:
        """Record that ``mirror`` holds ``rc`` for ``ino``, owning key ``rc.path``. Copies
        at other keys stay recorded (other hard links, or an old key still to delete)."""
        self.drop_remote(txn, mirror, ino, rc.path, owned=False)
        txn.put(MQ.pack(mirror, ino) + rc.path, rc.pack(), db=self.remote)
        txn.put(U16.pack(mirror) + rc.path, U64.pack(ino), db=self.db.db["rpath"])
        bump_counter(txn, self.counters, b"m%d.copies" % mirror, 1)
        bump_counter(txn, self.counters, b"m%d.copy_bytes" % mirror, rc.size)

    def ensure_dir(self, txn: lmdb.Transaction, path: bytes, uid: int = 0,
                   gid: int = 0) -> str:
        """Make ``path`` and its parents directories (an imported folder marker ``dir/``):
        "added" if any was created, "exists", or "blocked" when a file holds a name."""
        parent = self._must(txn, ROOT_INO)
        status = "exists"
        for part in path.split(b"/"):
            child = self.lookup_txn(txn, parent.ino, part)
            if child is None:
                now = now_ns()
                child = Inode(self._new_ino(txn), parent.ino, stat.S_IFDIR | 0o755, uid, gid,
                              2, 0, now, now, now, ver=1, name=part)
                self._put(txn, child)
                txn.put(dentry_key(parent.ino, part), U64.pack(child.ino), db=self.dentries)
                parent.nlink += 1
                parent.mtime_ns = parent.ctime_ns = now
                self._put(txn, parent)
                bump_counter(txn, self.counters, b"dirs", 1)
                self.entry_added(parent.ino, part)
                status = "added"
            elif not stat.S_ISDIR(child.mode):
                return "blocked"
            parent = child
        return status

    def add_remote_file(self, txn: lmdb.Transaction, path: bytes, size: int, mtime_ns: int,
                        mode: int, digest: bytes | None, mirror: int, key: bytes,
                        uid: int = 0, gid: int = 0) -> tuple[str, Inode | None]:
        """Register an object found on a mirror as a remote-only file at ``path``.

        Missing directories are created. Returns ("added", node), ("attached", node) when the
        same file (same size and hash) is already there, or ("exists", node) / ("blocked",
        None) when something else holds the path: nothing is overwritten.
        """
        parts = path.split(b"/")
        parent = self._must(txn, ROOT_INO)
        now = now_ns()
        for part in parts[:-1]:
            child = self.lookup_txn(txn, parent.ino, part)
            if child is None:
                ino = self._new_ino(txn)
                child = Inode(ino, parent.ino, stat.S_IFDIR | 0o755, uid, gid, 2, 0, now, now,
                              now, ver=1, name=part)
                self._put(txn, child)
                txn.put(dentry_key(parent.ino, part), U64.pack(ino), db=self.dentries)
                parent.nlink += 1
                parent.mtime_ns = parent.ctime_ns = now
                self._put(txn, parent)
                bump_counter(txn, self.counters, b"dirs", 1)
                self.entry_added(parent.ino, part)
            elif not stat.S_ISDIR(child.mode):
                return "blocked", None
            parent = child
        name = parts[-1]
        existing = self.lookup_txn(txn, parent.ino, name)
        if existing is not None:
            same = (stat.S_ISREG(existing.mode) and existing.size == size and digest is not None
                    and existing.hash_ver == existing.ver and existing.hash == digest)
            if same and self.remote_copy(txn, mirror, existing.ino) is None:
                self.set_remote(txn, mirror, existing.ino, RemoteCopy(
                    key, existing.ver, digest or ZERO_HASH, size, existing.mode,
                    existing.mtime_ns))
                return "attached", existing
            return "exists", existing
        ino = self._new_ino(txn)
        node = Inode(ino, parent.ino, stat.S_IFREG | (mode & 0o7777), uid, gid, 1, size, now,
                     mtime_ns, now, ver=1, local=LOCAL_NONE, name=name,
                     hash=digest or ZERO_HASH, hash_ver=1 if digest else 0)
        self._put(txn, node)
        txn.put(dentry_key(parent.ino, name), U64.pack(ino), db=self.dentries)
        parent.mtime_ns = parent.ctime_ns = now
        self._put(txn, parent)
        bump_counter(txn, self.counters, b"files", 1)
        bump_counter(txn, self.counters, b"bytes", size)
        self.set_remote(txn, mirror, ino, RemoteCopy(key, 1, digest or ZERO_HASH, size,
                                                     node.mode, mtime_ns))
        self.entry_added(parent.ino, name)
        return "added", node
