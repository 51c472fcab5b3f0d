"""The bounds on the cache: LRU eviction of clean files, and back-pressure on dirty data.

Owns the in-memory LRU order of local files and the estimate of data written but not yet
committed. Two bounds apply:

- ``cache_size`` and ``min_free`` bound what the cache holds. Clean files -- on every mirror
  that wants them, with the current version, not open, not pinned -- are evicted least recently
  used first, in the background and before a download or a write that needs the room. Dirty
  files are never evicted (invariant 2), nor clean ones whose mirrors are all down (found
  unreachable at start or by a transfer): they could not be read back. The bound is then
  exceeded rather than data lost or made unreadable, and when the disk itself is full writes
  fail with ENOSPC. ``META_RESERVE`` bytes stay free whatever ``min_free`` says, for the
  registry: content must never starve LMDB commits.
- ``dirty_limit`` bounds data not yet on every mirror: a writer beyond it waits for uploads
  (back-pressure); if no mirror can make progress (all down or paused) or the wait exceeds
  ``DIRTY_WAIT`` seconds, the write fails with ENOSPC. Nothing already written is touched.

Last access is recorded in memory only (an OrderedDict move per open), never in LMDB; at
startup the order is seeded from modification times.
"""

from __future__ import annotations

import logging
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import lmdb
import trio

from mirrorfs.cache.db import F_ORPHAN, F_PINNED, LOCAL_FULL, Inode
from mirrorfs.errors import CacheFull

if TYPE_CHECKING:
    from mirrorfs.cache.registry import Registry
    from mirrorfs.cache.store import Store
    from mirrorfs.fs import OpenFile
    from mirrorfs.stats import RuntimeStats

log = logging.getLogger(__name__)

DIRTY_WAIT = 60.0
REFRESH = 0.1  # seconds a disk-free / dirty reading stays fresh on the write path
#: free space kept for the registry whatever min_free says: a commit that cannot get a page
#: fails, and with it the close() that acknowledges data and the upload that makes room
META_RESERVE = 8 << 20


class Space:
    def __init__(self, reg: Registry, store: Store, stats: RuntimeStats, *, cache_size: int,
                 min_free: int, dirty_limit: int,
                 is_busy: Callable[[int], bool] = lambda ino: False,
                 is_up: Callable[[str], bool] = lambda mirror: True,
                 can_upload: Callable[[], bool] = lambda: False) -> None:
        self.reg = reg
        self.store = store
        self.stats = stats
        self.cache_size = cache_size
        self.min_free = max(min_free, META_RESERVE)
        self.dirty_limit = dirty_limit
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.unsynced = 0  # bytes written through handles since their last commit
        self.downloading = 0  # bytes of downloads in progress (not yet in local_bytes)
        self.is_busy = is_busy
        self.is_up = is_up
        self.can_upload = can_upload
        self.wake = trio.Event()
        self._free = 0
        self._dirty = 0
        self._local = 0
        self._read_at = 0.0

    # ------------------------------------------------------------ accounting

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._read_at > REFRESH:
            self._free = shutil.disk_usage(self.store.root).free
            self._dirty = self.reg.counter(b"dirty_bytes")
            self._local = self.reg.counter(b"local_bytes")
            self._read_at = now

    def touch(self, ino: int) -> None:
        self.lru[ino] = None
        self.lru.move_to_end(ino)

    def forget(self, ino: int) -> None:
        self.lru.pop(ino, None)

    def load(self) -> None:
        """Seed the LRU from the registry (oldest modification first)."""
        if self.reg.counter(b"local_files") == 0:
            return  # e.g. a node holding a million remote-only files: read none of them
        local = []
        with self.reg.db.begin() as txn:
            for _k, v in txn.cursor(db=self.reg.inodes):
                n = Inode.unpack(v)
                if stat.S_ISREG(n.mode) and n.local == LOCAL_FULL and not n.flags & F_ORPHAN:
                    local.append((n.mtime_ns, n.ino))
        local.sort()
        self.lru = OrderedDict((ino, None) for _t, ino in local)

    # ------------------------------------------------------------ eviction

    def over(self, extra: int = 0) -> bool:
        self._refresh()
        return (self._local + self.downloading + extra > self.cache_size
                or self._free - extra < self.min_free)

    def make_room(self, extra: int = 0) -> int:
        """Evict clean files, oldest first, until ``extra`` more bytes fit. Returns bytes freed."""
        freed = 0
        self._refresh(force=True)
        if not self.over(extra):
            return 0
        for ino in list(self.lru):
            if not self.over(extra):
                break
            n = self.evict(ino)
            if n is not None:
                freed += n
                self._local -= n
                self._free += n
        return freed

    def evictable(self, txn: lmdb.Transaction, node: Inode) -> bool:
        if (not stat.S_ISREG(node.mode) or node.local != LOCAL_FULL
                or node.flags & (F_PINNED | F_ORPHAN) or self.is_busy(node.ino)):
            return False
        if not self.reg.mirrors or self.reg.is_dirty_txn(txn, node.ino):
            return False
        # every path (one per hard link) on every mirror that wants it, at this version
        wanted = [(m, p) for p in self.reg.paths_txn(txn, node) for m in self.reg.mirrors
                  if m.wants(p)]
        if not wanted:
            return False
        for m, p in wanted:
            rc = self.reg.remote_copy(txn, m.index, node.ino, p)
            if rc is None or rc.ver != node.ver:
                return False
        # The local copy is the only readable one while every mirror holding it is down.
        return any(self.is_up(m.name) for m, _ in wanted)

    def evict(self, ino: int, force_pinned: bool = False) -> int | None:
        """Drop the local copy of a clean file; None if it is not clean (or not local)."""
        node, dropped = self.reg.drop_local(ino, self.evictable, force_pinned)
        if node is None:
            self.lru.pop(ino, None)
            return None
        if not dropped:
            return None
        self.store.remove(ino)
        self.lru.pop(ino, None)
        self.stats.bump("evictions")
        self.stats.bump("evicted_bytes", node.size)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("evicted inode %d (%d bytes)", ino, node.size)
        return node.size

    async def run(self) -> None:
        """Background bound keeper: wakes on uploads finishing and every second."""
        await trio.to_thread.run_sync(self.load)
        while True:
            if self.over():
                self.make_room()
            self.wake = trio.Event()
            with trio.move_on_after(1.0):
                await self.wake.wait()

    def kick(self) -> None:
        self.wake.set()

    # ------------------------------------------------------------ write path

    async def reserve_write(self, of: OpenFile, off: int, n: int) -> None:
        """Called before each write: cheap unless a bound is near."""
        self._refresh()
        if self._free - n < self.min_free:
            self.make_room(n)
            if self._free - n < self.min_free:
                raise CacheFull("cache disk is full and holds no clean file to evict")
        if self._local + n > self.cache_size:
            self.make_room(n)
        if self._dirty + self.unsynced + n > self.dirty_limit:
            await self._wait_for_uploads(n)
        self.unsynced += n
        self._free -= n  # until the next reading: writes between two must not overshoot

    async def _wait_for_uploads(self, n: int) -> None:
        deadline = trio.current_time() + DIRTY_WAIT
        while self._dirty + self.unsynced + n > self.dirty_limit:
            if not self.can_upload() or trio.current_time() > deadline:
                raise CacheFull(f"dirty data over dirty_limit ({self.dirty_limit} bytes) and "
                                "the mirrors are not taking uploads")
            await trio.sleep(0.1)
            self._refresh(force=True)

    def committed(self, nbytes: int) -> None:
        """A handle committed ``nbytes`` written through it: they are dirty bytes now. Moved
        over in the estimate rather than read again (a re-read here made every small file's
        next write pay a statvfs and two read transactions): dirty_bytes grows by at most
        that much (local_bytes too), so the bounds stay conservative until the next reading
        (at most REFRESH later)."""
        self.unsynced = max(0, self.unsynced - nbytes)
        self._dirty += nbytes
        self._local += nbytes

