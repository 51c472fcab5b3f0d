"""Startup repair: bring the registry, the cache directory and the journal back in line.

Runs before the mount is served, with no handle open and no worker alive. Each step handles
one row of the crash table in docs/ARCHITECTURE.md:

- a job claimed by a worker that died is pending again (the lease ended with the process);
- a file being written when the daemon died: its content file is the truth, so its size is
  re-read and a new version journaled (nothing written and then closed is lost, and data
  written but not yet closed is kept as well);
- an unlinked file that was still open: its content file goes, its remote deletes stay queued;
- a local file whose content file is missing or has the wrong size: remote-only if every mirror
  holds it, else flagged LOST and logged at ERROR (never silently replaced);
- a content file with no inode (crash between commit and unlink): removed.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator

from mirrorfs.cache.content import content_missing
from mirrorfs.cache.db import (
    F_OPEN_WRITE,
    F_ORPHAN,
    LOCAL_FULL,
    U64,
    Inode,
)
from mirrorfs.cache.registry import Registry
from mirrorfs.cache.store import TMP_SUFFIX, Store

log = logging.getLogger(__name__)


def recover(reg: Registry, store: Store, full_check: bool) -> dict[str, int]:
    """Repair after an unclean stop; ``full_check`` also compares every content file's size."""
    counts = {"claims": 0, "reopened": 0, "orphans": 0, "missing": 0, "lost": 0, "stray": 0}
    now = time.time()
    with reg.db.begin(write=True) as txn:
        for m in reg.mirrors:
            counts["claims"] += reg.journal.release_claims(txn, m.index, now)
    if not full_check:
        # After a clean stop nothing is flagged: every handle was committed and every open
        # orphan released at unmount (fs.close_all). A million inodes need not be read.
        return counts
    present: dict[int, str] = {}
    for ino, path in store.iter_inos():
        if path.endswith(TMP_SUFFIX):
            os.unlink(path)  # an interrupted download: never trusted
        else:
            present[ino] = path
    seen: set[int] = set()
    for node in _regular_files(reg, lambda n: n.local == LOCAL_FULL or bool(n.flags & F_ORPHAN)):
        # (remote-only inodes are skipped: a content file left by an eviction is stray)
        seen.add(node.ino)
        _check_node(reg, store, node, present.get(node.ino), counts)
    for ino, path in present.items():
        if ino not in seen:
            counts["stray"] += 1
            os.unlink(path)
    return counts


def _regular_files(reg: Registry, want: Callable[[Inode], bool]) -> Iterator[Inode]:
    """Regular files matching ``want``, read in batches (a million inodes never sit in memory
    at once, and no read transaction stays open while the caller writes)."""
    after = 0
    more = True
    while more:
        batch: list[Inode] = []
        more = False
        with reg.db.begin() as txn:
            cur = txn.cursor(db=reg.inodes)
            if cur.set_range(U64.pack(after + 1)):
                for k, v in cur:
                    after = U64.unpack(k)[0]
                    node = Inode.unpack(v)
                    if stat.S_ISREG(node.mode) and want(node):
                        batch.append(node)
                    if len(batch) >= 10_000:
                        more = True
                        break
        yield from batch


def _check_node(reg: Registry, store: Store, node: Inode, path: str | None,
                counts: dict[str, int]) -> None:
    if node.flags & F_ORPHAN:
        store.remove(node.ino)
        reg.release_orphan(node.ino)
        counts["orphans"] += 1
        return
    if node.local != LOCAL_FULL:
        return
    size = store.size(node.ino) if path is not None else None
    if node.flags & F_OPEN_WRITE and size is None:
        store.create_empty(node.ino)  # created, then the crash came before its content file
        size = 0
    if node.flags & F_OPEN_WRITE and size is not None:
        reg.commit_content(node.ino, size)
        counts["reopened"] += 1
        log.info("inode %d was being written when mirrorfs stopped: kept %d bytes",
                 node.ino, size)
        return
    if size == node.size:
        return
    outcome = content_missing(reg, node.ino)
    if outcome is None:
        return
    what, where = outcome
    if what == "lost":
        counts["lost"] += 1
        log.error("content of %r (inode %d) is missing or truncated in the cache and not "
                  "on every mirror: flagged LOST", where, node.ino)
    else:
        counts["missing"] += 1
        log.warning("content of %r (inode %d) missing from the cache: now remote-only",
                    where, node.ino)
    store.remove(node.ino)
