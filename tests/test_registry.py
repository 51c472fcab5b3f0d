"""The registry alone (LMDB, no mount): what a pull's replacement of an open file leaves."""

from __future__ import annotations

import stat
from pathlib import Path

from mirrorfs.cache.db import F_ORPHAN, ROOT_INO, Database, RemoteCopy
from mirrorfs.cache.registry import MirrorRule, Registry

PULL, OTHER = 1, 2


def uploaded_file(tmp_path: Path) -> tuple[Registry, int]:
    """A registry with two mirrors and ``doc`` (ino returned) uploaded to both."""
    reg = Registry(Database(str(tmp_path / "meta")),
                   [MirrorRule(PULL, "pull"), MirrorRule(OTHER, "other")], 0.0)
    node = reg.mknode(ROOT_INO, b"doc", stat.S_IFREG | 0o644, 0, 0)
    with reg.db.begin(write=True) as txn:
        for m in (PULL, OTHER):
            job = reg.journal.claim(txn, m, node.ino)
            assert job is not None
            reg.set_remote(txn, m, node.ino, RemoteCopy(b"doc", node.ver, b"h" * 16, 0,
                                                        node.mode, node.mtime_ns))
            reg.job_done(txn, m, node.ino, job.seq)
    return reg, node.ino


def counters(reg: Registry) -> dict[bytes, int]:
    names = [b"files", b"bytes", b"local_files", b"local_bytes", b"dirty_files",
             b"dirty_bytes", b"m1.copies", b"m2.copies", b"m1.jobs", b"m2.jobs"]
    return {n: reg.counter(n) for n in names}


def test_supersede_moves_every_mirror_record_to_the_new_inode(tmp_path: Path) -> None:
    reg, old = uploaded_file(tmp_path)
    reg.setxattr(old, b"user.tag", b"kept")
    with reg.db.begin(write=True) as txn:
        reg.requeue(txn, old, OTHER)  # a job not yet run on the other mirror
    before = counters(reg)
    with reg.db.begin(write=True) as txn:
        node = reg.get_txn(txn, old)
        assert node is not None
        new = reg.supersede(txn, node)
    assert new is not None and new.ino != old
    assert reg.lookup(ROOT_INO, b"doc").ino == new.ino  # type: ignore[union-attr]
    orphan = reg.get(old)
    assert orphan is not None and orphan.flags & F_ORPHAN and orphan.nlink == 0
    with reg.db.begin() as txn:
        for m in (PULL, OTHER):
            # the orphan owns nothing a job could delete or rename; the new inode owns the key
            assert reg.remote_copy(txn, m, old) is None
            assert reg.journal.get(txn, m, old) is None
            assert reg.remote_copy(txn, m, new.ino) is not None
            assert reg.rpath_owner(txn, m, b"doc") == new.ino
        assert reg.journal.get(txn, PULL, new.ino) is None
        assert reg.journal.get(txn, OTHER, new.ino) is not None
    assert reg.getxattr(new.ino, b"user.tag") == b"kept"
    assert counters(reg) == {**before, b"local_files": before[b"local_files"] - 1}
    assert reg.release_orphan(old)
    assert reg.get(old) is None and reg.getxattr(old, b"user.tag") is None


def test_supersede_leaves_a_file_alone_while_one_of_its_jobs_runs(tmp_path: Path) -> None:
    reg, ino = uploaded_file(tmp_path)
    with reg.db.begin(write=True) as txn:
        reg.requeue(txn, ino, OTHER)
        assert reg.journal.claim(txn, OTHER, ino) is not None  # an upload in flight
    before = counters(reg)
    with reg.db.begin(write=True) as txn:
        node = reg.get_txn(txn, ino)
        assert node is not None
        assert reg.supersede(txn, node) is None
    assert reg.lookup(ROOT_INO, b"doc").ino == ino  # type: ignore[union-attr]
    assert counters(reg) == before


def test_inode_numbers_are_never_handed_out_twice(tmp_path: Path) -> None:
    """Numbers come from blocks reserved in LMDB: one failed create (its transaction, and
    with it a block reservation, aborted) and a restart reuse none that was committed."""
    import errno

    import pytest

    from mirrorfs.cache.registry import FsError

    db = Database(str(tmp_path / "meta"))
    reg = Registry(db, [], 0.0)
    seen = [reg.mknode(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0).ino for i in range(300)]

    def fail(ino: int) -> int:
        raise FsError(errno.ENOSPC)

    for i in range(300):  # aborted creates, across block boundaries
        with pytest.raises(FsError):
            reg.mknode(ROOT_INO, b"g%d" % i, stat.S_IFREG | 0o644, 0, 0, content=fail)
        seen.append(reg.mknode(ROOT_INO, b"h%d" % i, stat.S_IFREG | 0o644, 0, 0).ino)
    reg2 = Registry(db, [], 0.0)  # a restart (the daemon's in-memory block is gone)
    seen += [reg2.mknode(ROOT_INO, b"k%d" % i, stat.S_IFREG | 0o644, 0, 0).ino
             for i in range(300)]
    assert len(set(seen)) == len(seen)
    with db.begin() as txn:
        inos = [reg2.lookup_txn(txn, ROOT_INO, b"f0"), reg2.lookup_txn(txn, ROOT_INO, b"k299")]
    assert all(n is not None for n in inos)
    db.close()
