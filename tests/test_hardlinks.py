"""Hard links on the mirrors: every path of a linked inode is an object of its own.

Mirrors serve objects by path (a web server or CDN reads them directly), so an inode with
three names is three objects with the same bytes on every mirror; S3 makes the extra ones
with a server-side copy. Deleting or renaming one name touches that object only. Real
servers on loopback (moto, pyftpdlib) and a directory mirror; a real kernel mount.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.mountutil import Mount
from tests.test_mirrors import admin, drain, mirrors_for, s3_objects, tree


def mirror_trees(tmp_path: Path, s3: Any, ftp: Any) -> dict[str, dict[str, bytes]]:
    return {"s3": s3_objects(s3), "ftp": tree(ftp.root), "dir": tree(tmp_path / "dirmirror")}


def assert_mirrors(tmp_path: Path, s3: Any, ftp: Any, expect: dict[str, bytes]) -> None:
    for name, got in mirror_trees(tmp_path, s3, ftp).items():
        assert got == expect, f"{name} holds {sorted(got)}, expected {sorted(expect)}"


def test_every_path_of_a_linked_inode_on_every_mirror(make_mount: Any, s3: Any, ftp: Any,
                                                      tmp_path: Path) -> None:
    m = make_mount(mirrors_for(tmp_path, s3, ftp), upload_delay=0.2)
    p = m.path
    (p / "d").mkdir()
    data = os.urandom(300_000)
    (p / "f").write_bytes(data)
    os.link(p / "f", p / "g")
    os.link(p / "f", p / "d" / "h")  # into another directory
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"f": data, "g": data, "d/h": data})
    st = admin(m, "stats")["mirrors"]
    # S3 got the content once and copied it on the server; FTP and dir have no copy
    assert (st["s3"]["uploads"], st["s3"]["server_copies"]) == (1, 2), st["s3"]
    assert st["ftp"]["uploads"] == st["dir"]["uploads"] == 3
    assert all(st[n]["uploaded"] == 3 for n in ("s3", "ftp", "dir")), st

    # a write through one name is a change of every path
    new = os.urandom(200_000)
    (p / "g").write_bytes(new)
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"f": new, "g": new, "d/h": new})

    # deleting one name deletes only that object
    os.unlink(p / "f")
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"g": new, "d/h": new})

    # renaming one name renames only that object
    os.rename(p / "d" / "h", p / "h2")
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"g": new, "h2": new})

    # another file renamed over a link: that key gets the other file, the link's inode
    # keeps its other name
    other = os.urandom(1000)
    (p / "other").write_bytes(other)
    os.rename(p / "other", p / "g")
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"g": other, "h2": new})
    assert os.stat(p / "h2").st_nlink == 1
    st = admin(m, "stats")
    assert st["journal_length"] == 0 and all(v["failed"] == 0 for v in st["mirrors"].values())


def test_link_of_a_remote_only_file(make_mount: Any, s3: Any, ftp: Any,
                                    tmp_path: Path) -> None:
    """A file evicted from the cache gets a second name: S3 copies it on the server, the
    mirrors without a copy get it uploaded from a verified download; both names read back."""
    m = make_mount(mirrors_for(tmp_path, s3, ftp), upload_delay=0.2)
    p = m.path
    data = os.urandom(500_000)
    (p / "f").write_bytes(data)
    drain(m)
    assert not admin(m, "evict", str(p / "f"))["kept"]
    assert admin(m, "state", str(p / "f"))["f"]["local"] is False
    os.link(p / "f", p / "g")
    assert os.stat(p / "g").st_nlink == 2
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"f": data, "g": data})
    assert (p / "g").read_bytes() == data and (p / "f").read_bytes() == data
    # once every path is on every mirror the inode may leave the cache again
    assert not admin(m, "evict", str(p / "g"))["kept"]


def test_sigkill_between_link_and_upload(make_mount: Any, s3: Any, ftp: Any,
                                         tmp_path: Path) -> None:
    """link() is acknowledged when it returns: a crash before any mirror heard of it still
    ends with every path on every mirror after restart and drain."""
    m: Mount = make_mount(mirrors_for(tmp_path, s3, ftp), upload_delay=0.2)
    p = m.path
    data = os.urandom(100_000)
    (p / "f").write_bytes(data)
    drain(m)
    admin(m, "pause")
    (p / "d").mkdir()
    os.link(p / "f", p / "g")
    os.link(p / "f", p / "d" / "h")
    os.unlink(p / "f")
    m.kill()
    assert_mirrors(tmp_path, s3, ftp, {"f": data})  # nothing happened remotely yet
    m.start()
    assert os.stat(p / "g").st_nlink == 2
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"g": data, "d/h": data})
    assert (p / "d" / "h").read_bytes() == data
