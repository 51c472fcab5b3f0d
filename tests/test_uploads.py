"""The uploader alone, in process: a real registry, cache store and S3 mirror (moto), no
mount, because the race below needs an unlink between a job's claim and its first read of the
content file, which a mount cannot time. Plus the rule that its LMDB access is the named
operations of cache/uploads.py, short and never across an await."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path
from typing import Any

import trio
import trio.testing

from mirrorfs.cache import uploads
from mirrorfs.cache.db import ROOT_INO, Database
from mirrorfs.cache.registry import MirrorRule, Registry
from mirrorfs.cache.store import Store
from mirrorfs.remotes.base import make_remote
from mirrorfs.uploader import INLINE_READ, MirrorState, Uploader
from tests.servers import bucket_objects

MIRROR = 1
SRC = Path(__file__).resolve().parent.parent / "mirrorfs"


def _setup(tmp_path: Path, s3: Any) -> tuple[Registry, Store, MirrorState]:
    reg = Registry(Database(str(tmp_path / "meta")), [MirrorRule(MIRROR, "s3")], 0.0)
    store = Store(str(tmp_path / "cache"))
    remote = make_remote("s3", "s3", s3.options())
    return reg, store, MirrorState(MirrorRule(MIRROR, "s3"), remote, 2)


def _file(reg: Registry, store: Store, name: bytes, data: bytes) -> int:
    node = reg.mknode(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0)
    with open(store.path(node.ino), "wb") as f:
        f.write(data)
    reg.commit_content(node.ino, len(data))
    return node.ino


def test_a_file_unlinked_under_its_claimed_upload_is_no_failed_attempt(
        tmp_path: Path, s3: Any) -> None:
    """The unlink removes the content file of a job already running: the upload finds no
    file. That is not a failure to retry with backoff (it was, ~550 times in a run of 5,000
    files, each logged and backed off): the job runs again at once and finds nothing to do.
    A file next to it, unlinked after it was uploaded, is deleted from the mirror as before."""
    reg, store, m = _setup(tmp_path, s3)
    gone = _file(reg, store, b"gone", b"x" * (INLINE_READ + 1))  # read in a thread
    kept = _file(reg, store, b"kept", b"y" * 3000)

    async def main() -> None:
        up = Uploader(reg, store, None, [m])
        claimed = dict(uploads.claim_due(reg, MIRROR, reg.clock() + 1, 10))
        assert set(claimed) == {gone, kept}
        await up._run(m, kept, claimed[kept])
        assert bucket_objects(s3) == {"kept": b"y" * 3000}
        # the job of ``gone`` starts and read its inode, then waits for the hash limiter;
        # meanwhile the file is unlinked (as fs.unlink does it: the content file goes)
        tokens = [object(), object()]
        for t in tokens:
            await up.hash_limiter.acquire_on_behalf_of(t)
        async with trio.open_nursery() as n:
            n.start_soon(up._run, m, gone, claimed[gone])
            await trio.testing.wait_all_tasks_blocked()
            assert up.hash_limiter.statistics().tasks_waiting == 1
            _node, may_go = reg.unlink(ROOT_INO, b"gone", False)
            assert may_go
            store.remove(gone)
            for t in tokens:
                up.hash_limiter.release_on_behalf_of(t)
        with reg.db.begin() as txn:
            job = reg.journal.get(txn, MIRROR, gone)
        assert job is not None and job.attempts == 0 and job.due <= reg.clock(), job
        for ino, seq in uploads.claim_due(reg, MIRROR, reg.clock() + 1, 10):
            await up._run(m, ino, seq)
        with reg.db.begin() as txn:
            assert reg.journal.get(txn, MIRROR, gone) is None
            assert reg.get_txn(txn, gone) is None  # the orphan's record went with its job
        reg.unlink(ROOT_INO, b"kept", False)
        store.remove(kept)
        for ino, seq in uploads.claim_due(reg, MIRROR, reg.clock() + 1, 10):
            await up._run(m, ino, seq)

    trio.run(main)
    assert bucket_objects(s3) == {}
    assert reg.counter(b"m%d.uploads" % MIRROR) == 1
    assert reg.counter(b"m%d.deletes" % MIRROR) == 1


def _calls(tree: ast.AST) -> list[str]:
    return [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_the_uploader_reaches_lmdb_only_through_named_operations() -> None:
    """uploader.py opens no transaction and writes no record itself (cache/uploads.py)."""
    tree = ast.parse((SRC / "uploader.py").read_text())
    raw = [c for c in _calls(tree) if c.endswith((".begin", ".put", ".delete", ".cursor"))
           and not c.startswith("m.remote.")]
    assert raw == []


def test_no_lmdb_transaction_spans_an_await() -> None:
    """Nowhere in mirrorfs/ is there an ``await`` inside a ``with ...begin(...)`` block: a
    transaction held across a checkpoint would block or see stale state (ARCHITECTURE)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.With | ast.AsyncWith):
                continue
            if not any(".begin(" in ast.unparse(item.context_expr) for item in node.items):
                continue
            for inner in (n for stmt in node.body for n in ast.walk(stmt)):
                if isinstance(inner, ast.Await | ast.AsyncFor | ast.AsyncWith):
                    bad.append(f"{os.path.relpath(path, SRC)}:{inner.lineno}")
    assert bad == []
