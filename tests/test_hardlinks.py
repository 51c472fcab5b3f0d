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

import pytest

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
    admin(m, "resume")  # (a pause persists across restarts)
    assert os.stat(p / "g").st_nlink == 2
    drain(m)
    assert_mirrors(tmp_path, s3, ftp, {"g": data, "d/h": data})
    assert (p / "d" / "h").read_bytes() == data


def test_second_node_sees_each_path_as_a_file(make_mount: Any, s3: Any) -> None:
    """The change log has no links: another node gets one file per path. A write through
    one name on A changes every path there, so B gets all of them; a link made on B is B's
    business, and a change A makes to one of its paths splits that path off on B."""
    from tests.test_multinode import node, read_or_none

    a = node(make_mount, s3, "A")
    b = node(make_mount, s3, "B")
    v1, v2, v3 = os.urandom(50_000), os.urandom(60_000), os.urandom(70_000)
    (a.path / "f").write_bytes(v1)
    os.link(a.path / "f", a.path / "g")
    b.wait_for(lambda: read_or_none(b.path / "f") == v1 and read_or_none(b.path / "g") == v1,
               timeout=30)
    fb, gb = os.stat(b.path / "f"), os.stat(b.path / "g")
    assert fb.st_ino != gb.st_ino and fb.st_nlink == gb.st_nlink == 1
    (a.path / "g").write_bytes(v2)  # one inode on A: both paths change
    b.wait_for(lambda: read_or_none(b.path / "f") == v2 and read_or_none(b.path / "g") == v2,
               timeout=30)
    os.link(b.path / "f", b.path / "h")  # B links f; A sees a new file h
    a.wait_for(lambda: read_or_none(a.path / "h") == v2, timeout=30)
    assert os.stat(a.path / "h").st_nlink == 1
    drain(b)
    (a.path / "f").write_bytes(v3)
    b.wait_for(lambda: read_or_none(b.path / "f") == v3 and read_or_none(b.path / "g") == v3,
               timeout=30)
    # on B, f took A's version alone: its other name h keeps its own content, as on A
    assert read_or_none(b.path / "h") == v2 and os.stat(b.path / "h").st_nlink == 1
    assert os.stat(b.path / "f").st_ino != os.stat(b.path / "h").st_ino
    (a.path / "g").unlink()
    b.wait_for(lambda: not (b.path / "g").exists(), timeout=30)
    drain(a)
    drain(b)
    objs = s3_objects(s3)
    assert {k: v for k, v in objs.items() if not k.startswith(".mirrorfs/")} == \
        {"f": v3, "h": v2}


@pytest.mark.parametrize("then", ["unlink", "keep"])
def test_kill_after_a_server_side_copy_before_recording_it(make_mount: Any, s3: Any,
                                                           tmp_path: Path, then: str) -> None:
    """The copy that gives a new link its object on S3 landed and was not recorded (the
    ``copy-done`` seam of uploader.crash_point). After the restart the link is removed (the
    copied object must go: nothing else knows it) or kept (it is copied again and recorded);
    either way the mirrors equal the mount once drained."""
    from tests.test_proof import assert_mirrors_equal, start_paused, wait_dead

    (tmp_path / "dm").mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options()},
                    "dir": {"type": "dir", "path": str(tmp_path / "dm")}}, upload_delay=0,
                   env={"MIRRORFS_TEST_CRASH_AT": "copy-done"})
    data = os.urandom(20_000)
    (m.path / "f").write_bytes(data)
    drain(m)
    os.link(m.path / "f", m.path / "g")
    wait_dead(m)
    assert "test seam: SIGKILL at copy-done" in m.log_text()
    assert s3_objects(s3) == {"f": data, "g": data}  # copied, never recorded
    start_paused(m)
    if then == "unlink":
        os.unlink(m.path / "g")
    admin(m, "resume")
    drain(m)
    assert_mirrors_equal(m, tmp_path, s3, None)
    assert sorted(s3_objects(s3)) == (["f"] if then == "unlink" else ["f", "g"])
    assert admin(m, "stats")["journal_length"] == 0
