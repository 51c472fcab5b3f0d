"""Build a large registry directly in LMDB (not through the mount), for scale tests and benches.

Files are spread over directories of 1,000 and registered as uploaded to one mirror and
remote-only, so the counters match what the filesystem itself would have produced.
"""

from __future__ import annotations

import stat
import sys
import time

from mirrorfs.cache.db import (
    LOCAL_NONE,
    ROOT_INO,
    U64,
    Database,
    Inode,
    RemoteCopy,
    set_counter,
)
from mirrorfs.cache.registry import MirrorRule, Registry, dentry_key


def build(cache_dir: str, nfiles: int, mirror: str = "s3", per_dir: int = 1000,
          size: int = 1000) -> float:
    """Register ``nfiles`` files; returns seconds taken."""
    t0 = time.monotonic()
    db = Database(f"{cache_dir}/meta")
    reg = Registry(db, [], 0.0)
    idx = reg.mirror_index(mirror)
    reg.mirrors = [MirrorRule(idx, mirror)]
    now = time.time_ns()
    batch = 50_000
    made = 0
    d_ino = None
    while made < nfiles:
        with db.begin(write=True) as txn:
            root = reg.get_txn(txn, ROOT_INO)
            assert root is not None
            for _ in range(min(batch, nfiles - made)):
                if made % per_dir == 0:
                    d_ino = reg._new_ino(txn)
                    name = b"d%07d" % (made // per_dir)
                    d = Inode(d_ino, ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2, 0, now, now, now,
                              ver=1, name=name)
                    txn.put(U64.pack(d_ino), d.pack(), db=reg.inodes)
                    txn.put(dentry_key(ROOT_INO, name), U64.pack(d_ino), db=reg.dentries)
                    root.nlink += 1
                assert d_ino is not None
                ino = reg._new_ino(txn)
                name = b"f%07d.jpg" % made
                node = Inode(ino, d_ino, stat.S_IFREG | 0o644, 0, 0, 1, size, now, now, now,
                             ver=1, local=LOCAL_NONE, name=name, hash=b"\1" * 16, hash_ver=1)
                txn.put(U64.pack(ino), node.pack(), db=reg.inodes)
                txn.put(dentry_key(d_ino, name), U64.pack(ino), db=reg.dentries)
                path = b"d%07d/" % (made // per_dir) + name
                reg.set_remote(txn, idx, ino, RemoteCopy(path, 1, b"\1" * 16, size,
                                                         node.mode, now))
                made += 1
            txn.put(U64.pack(ROOT_INO), root.pack(), db=reg.inodes)
    with db.begin(write=True) as txn:
        set_counter(txn, reg.counters, b"files", nfiles)
        set_counter(txn, reg.counters, b"bytes", nfiles * size)
        set_counter(txn, reg.counters, b"dirs", 1 + -(-nfiles // per_dir))
        set_counter(txn, reg.counters, b"local_files", 0)
        set_counter(txn, reg.counters, b"local_bytes", 0)
    db.flush()
    db.close()
    return time.monotonic() - t0


if __name__ == "__main__":
    print(f"{build(sys.argv[1], int(sys.argv[2])):.1f}s")
