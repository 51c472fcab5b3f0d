"""Whether an inode's content is local: the registry's side of downloads, re-downloads and
start-up repair (cache/fetch.py, maintenance.py and cache/recover.py call these).

Owns the transitions of ``Inode.local`` and ``F_LOST`` outside the namespace operations, and
the chunk hashes a download computed itself. Each function is one short write transaction.
The content files are the store's: a caller removes one only after the transaction that made
the inode remote-only committed (a crash in between leaves a stray file, which start-up
repair removes), and installs one (``install``) inside the transaction that marks it local.
"""

from __future__ import annotations

from collections.abc import Callable

from mirrorfs.cache.db import F_LOST, F_ORPHAN, LOCAL_FULL, LOCAL_NONE, U64, Inode
from mirrorfs.cache.registry import Registry


def drop_if_mirrored(reg: Registry, ino: int) -> bool:
    """Make a clean file remote-only if a mirror holds its current version (its cache file is
    then the caller's to remove); False if not, or if it is dirty or gone."""
    with reg.db.begin(write=True) as txn:
        node = reg.get_txn(txn, ino)
        if node is None or reg.is_dirty_txn(txn, ino):
            return False
        if not any((rc := reg.remote_copy(txn, m.index, ino)) is not None
                   and rc.ver == node.ver for m in reg.mirrors):
            return False
        reg.set_local(txn, node, LOCAL_NONE)
    return True


def mark_downloaded(reg: Registry, ino: int, ver: int, wanted: Callable[[Inode], bool],
                    install: Callable[[], None], discard: Callable[[], None],
                    chunks: bytes | None, whole: bytes | None) -> None:
    """A download of version ``ver`` is complete and verified. If ``wanted`` still says yes
    (the inode is that version, not local, not orphaned: checked in the transaction),
    ``install`` puts the file in place and the inode becomes local, with the ``chunks`` and
    ``whole`` hashes computed on the way (objects that had none); else ``discard``."""
    with reg.db.begin(write=True) as txn:
        node = reg.get_txn(txn, ino)
        if (node is None or node.ver != ver or node.local == LOCAL_FULL
                or node.flags & F_ORPHAN or not wanted(node)):
            discard()
            return
        install()
        reg.set_local(txn, node, LOCAL_FULL)
        if chunks is not None and whole is not None:
            txn.put(U64.pack(ino), U64.pack(ver) + chunks, db=reg.chunks)
            if node.hash_ver != node.ver:
                node.hash = whole
                node.hash_ver = node.ver
                txn.put(U64.pack(ino), node.pack(), db=reg.inodes)


def content_missing(reg: Registry, ino: int) -> tuple[str, bytes] | None:
    """The cache file of a local inode is missing or truncated: remote-only if every mirror
    can give it back ("remote-only"), else flagged LOST ("lost"). With the path, for the log;
    None if the inode is gone."""
    with reg.db.begin(write=True) as txn:
        cur = reg.get_txn(txn, ino)
        if cur is None:
            return None
        path = reg.path_txn(txn, cur)
        if reg.is_dirty_txn(txn, ino) or not reg.mirrors:
            cur.flags |= F_LOST
            txn.put(U64.pack(cur.ino), cur.pack(), db=reg.inodes)
            return "lost", path
        reg.set_local(txn, cur, LOCAL_NONE)
        return "remote-only", path
