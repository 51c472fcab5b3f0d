"""A file that changes in place (a pull) while its old version is downloading: the fetcher
alone, on a real registry, cache store and directory mirror (no mount: the race needs the
two events in one trio step, which a mount cannot time).

Before, a new open of the new version was handed the old version's download: its bytes,
and its size, for a file whose registry entry (and the kernel) said otherwise.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio

from mirrorfs.cache.db import LOCAL_FULL, U64, Database
from mirrorfs.cache.fetch import Fetcher
from mirrorfs.cache.registry import MirrorRule, Registry
from mirrorfs.cache.store import Store
from mirrorfs.remotes.base import make_remote
from mirrorfs.stats import RuntimeStats

MiB = 1 << 20


def put_object(base: Path, key: str, data: bytes) -> None:
    tmp = base / f".tmp-{key}"
    tmp.write_bytes(data)
    os.replace(tmp, base / key)  # as a store replaces an object: readers keep the old one


def test_a_new_version_gets_its_own_download(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    v1, v2 = os.urandom(9 * MiB + 5), os.urandom(13 * MiB + 7)
    put_object(mirror, "f", v1)
    reg = Registry(Database(str(tmp_path / "meta")), [MirrorRule(1, "d")], 0.0)
    store = Store(str(tmp_path / "cache"))
    with reg.db.begin(write=True) as txn:
        status, node = reg.add_remote_file(txn, b"f", len(v1), 0, stat.S_IFREG | 0o644,
                                           None, 1, b"f")
    assert status == "added" and node is not None
    ino = node.ino

    async def main() -> None:
        remote = make_remote("d", "dir", {"path": str(mirror)})
        async with trio.open_nursery() as nursery:
            fetcher = Fetcher(reg, store, {"d": remote}, ["d"], RuntimeStats(), nursery)
            old_node = reg.get(ino)
            assert old_node is not None
            # a write-open (or an upload elsewhere) fetching version 1, and a reader of it
            nursery.start_soon(fetcher.fetch_all, old_node)
            old_fh = fetcher.open_remote(old_node)
            await trio.sleep(0)
            # ... when a pull takes another node's version in place (pull._fast_forward)
            put_object(mirror, "f", v2)
            with reg.db.begin(write=True) as txn:
                cur = reg.get_txn(txn, ino)
                assert cur is not None
                cur.ver += 1
                cur.size = len(v2)
                txn.put(U64.pack(ino), cur.pack(), db=reg.inodes)
                rc = reg.remote_copy(txn, 1, ino)
                assert rc is not None
                rc.ver, rc.size = cur.ver, len(v2)
                reg.set_remote(txn, 1, ino, rc)
            new_node = reg.get(ino)
            assert new_node is not None
            fh = fetcher.open_remote(new_node)
            got = bytearray()
            while piece := await fetcher.read(fh, len(got), MiB):
                got += piece
            assert bytes(got) == v2
            # the fetch that began on version 1 ends with version 2 in the cache
            with trio.fail_after(30):
                while (n := reg.get(ino)) is None or n.local != LOCAL_FULL:
                    await trio.sleep(0.05)
            with open(store.path(ino), "rb") as f:
                assert f.read() == v2
            fetcher.release(fh)
            fetcher.release(old_fh)
            await remote.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
