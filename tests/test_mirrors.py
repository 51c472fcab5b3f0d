"""Issue 3: every change written through the real mount reaches S3, FTP and directory mirrors.

Servers are real and on loopback (moto in server mode, pyftpdlib, Debian's vsftpd); what the
mirrors hold is read back with plain boto3 and plain file reads of the FTP root.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.mountutil import Mount
from tests.servers import Vsftpd

CLI = [sys.executable, "-m", "mirrorfs.cli"]


def admin(m: Mount, *args: str, check: bool = True, timeout: float = 300) -> Any:
    """``mirrorfs ARGS -c CONFIG --json``, answered as JSON. The CLI's own code runs (argument
    parsing, finding the mount, the control socket or, unmounted, the registry, the JSON
    output) but in this process: a fresh interpreter cost ~0.3 s of CPU per call, and the
    suite makes hundreds (tests/test_cli.py and test_admin.py run the real command). In a
    worker thread, so that a daemon that never answers fails the test instead of hanging it."""
    from mirrorfs.cli import main

    out, err = io.StringIO(), io.StringIO()
    result: list[int] = []

    def run() -> None:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                result.append(main([*args, "-c", str(m.config), "--json"]))
            except SystemExit as exc:  # argparse
                result.append(exc.code if isinstance(exc.code, int) else 2)

    t = threading.Thread(target=run, name="mirrorfs-admin", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"mirrorfs {' '.join(args)}: no answer in {timeout} s")
    if check and result != [0]:
        raise AssertionError(f"mirrorfs {' '.join(args)} failed ({result}): {err.getvalue()}")
    return json.loads(out.getvalue()) if out.getvalue().strip() else None


def drain(m: Mount, timeout: float = 120) -> None:
    r = admin(m, "drain", "--timeout", str(timeout))
    assert r["drained"], r


def s3_objects(s3: Any) -> dict[str, bytes]:
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = c.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
    return out


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not f.startswith(".mirrorfs-"):
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def mirrors_for(tmp_path: Path, s3: Any, ftp: Any) -> dict[str, dict[str, Any]]:
    (tmp_path / "dirmirror").mkdir(exist_ok=True)
    return {
        "s3": {"type": "s3", **s3.options()},
        "ftp": {"type": "ftp", **ftp.options()},
        "dir": {"type": "dir", "path": str(tmp_path / "dirmirror")},
    }


def test_upload_after_delay_to_every_mirror(make_mount: Any, s3: Any, ftp: Any,
                                            tmp_path: Path) -> None:
    """Each mirror gets the file once the cool-down after its last change is over, not before.
    The last change comes after ``t0``, so its job is due at ``t0 + delay`` at the earliest;
    when the object appeared on each mirror is read from the mirror itself (the ctime of the
    FTP and directory files, S3's Last-Modified, to the second). Only the order of the times is
    checked: a slow machine makes them later, never earlier."""
    delay = 3
    m = make_mount(mirrors_for(tmp_path, s3, ftp), upload_delay=delay)
    data = os.urandom(1_500_000)
    t0 = time.time()
    (m.path / "sub").mkdir()
    (m.path / "sub" / "a.bin").write_bytes(data)
    m.wait_for(lambda: "sub/a.bin" in s3_objects(s3)
               and "sub/a.bin" in tree(ftp.root)
               and "sub/a.bin" in tree(tmp_path / "dirmirror"), timeout=30)
    earliest = t0 + delay - 0.05  # file times come from the kernel's coarse clock
    assert os.stat(ftp.root / "sub" / "a.bin").st_ctime >= earliest
    assert os.stat(tmp_path / "dirmirror" / "sub" / "a.bin").st_ctime >= earliest
    head = s3.client().head_object(Bucket=s3.bucket, Key="sub/a.bin")
    assert head["LastModified"].timestamp() >= int(earliest)
    assert s3_objects(s3)["sub/a.bin"] == data
    assert tree(ftp.root)["sub/a.bin"] == data
    assert tree(tmp_path / "dirmirror")["sub/a.bin"] == data
    assert head["Metadata"]["mirrorfs-xxh3"] == xxhash.xxh3_128_hexdigest(data)
    assert int(head["Metadata"]["mirrorfs-size"]) == len(data)


def test_ten_rewrites_make_one_upload_per_mirror(make_mount: Any, s3: Any, ftp: Any,
                                                 tmp_path: Path) -> None:
    m = make_mount(mirrors_for(tmp_path, s3, ftp), upload_delay=3)
    s3.start_recording()
    ftp.commands.clear()
    for i in range(10):
        (m.path / "f.txt").write_text(f"version {i}\n")
    m.wait_for(lambda: s3_objects(s3).get("f.txt") == b"version 9\n", timeout=30)
    drain(m)
    puts = [p for meth, p in s3.recorded() if meth == "PUT" and p.endswith("/f.txt")]
    assert len(puts) == 1, puts
    stors = [c for c in ftp.commands if c.upper().startswith("STOR")]
    assert len(stors) == 1, stors
    assert tree(ftp.root) == {"f.txt": b"version 9\n"}
    st = admin(m, "stats")
    assert {n: v["uploads"] for n, v in st["mirrors"].items()} == {"s3": 1, "ftp": 1, "dir": 1}


def test_created_and_deleted_inside_cooldown_costs_nothing(make_mount: Any, s3: Any,
                                                           tmp_path: Path) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=2)
    s3.start_recording()
    (m.path / "tmp.txt").write_text("scratch")
    (m.path / "tmp.txt").unlink()
    (m.path / "draft.txt").write_text("final")
    os.rename(m.path / "draft.txt", m.path / "final.txt")
    drain(m)
    reqs = [(meth, p) for meth, p in s3.recorded() if meth in ("PUT", "DELETE", "POST")]
    assert reqs == [("PUT", f"/{s3.bucket}/final.txt")], reqs
    assert s3_objects(s3) == {"final.txt": b"final"}


def test_renames_and_deletes_are_mirrored_exactly(make_mount: Any, s3: Any, ftp: Any,
                                                  tmp_path: Path) -> None:
    """A directory of 300 files renamed (one local transaction, 300 renames on each of the
    three mirrors, many more than a mirror runs at once), a file moved into it, files deleted
    in it and beside it: every mirror ends equal to the tree."""
    n = 300
    m = make_mount(mirrors_for(tmp_path, s3, ftp), upload_delay=0.2)
    d = m.path / "album"
    d.mkdir()
    for i in range(n):
        (d / f"p{i:04d}.jpg").write_bytes(b"img%d" % i)
    (m.path / "keep.txt").write_text("keep")
    (m.path / "old.txt").write_text("old")
    (m.path / "gone.txt").write_text("gone")
    drain(m, timeout=300)
    assert len(s3_objects(s3)) == n + 3
    os.rename(d, m.path / "photos")
    os.rename(m.path / "old.txt", m.path / "photos" / "new.txt")
    (m.path / "gone.txt").unlink()
    for i in range(0, n, 30):
        (m.path / "photos" / f"p{i:04d}.jpg").unlink()
    drain(m, timeout=300)
    local = tree(m.path)
    assert len(local) == n - 10 + 2
    assert s3_objects(s3) == local
    assert tree(ftp.root) == local
    assert tree(tmp_path / "dirmirror") == local


def test_replaced_file_and_reused_name_keep_the_newest(make_mount: Any, s3: Any,
                                                       tmp_path: Path) -> None:
    """Ordering: a key freed by a rename or delete and reused at once ends with the right
    object on the mirror (no resurrection, no loss)."""
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0.2)
    (m.path / "a").write_text("A1")
    (m.path / "b").write_text("B1")
    drain(m)
    os.rename(m.path / "a", m.path / "c")  # a's object must move to c
    (m.path / "a").write_text("A2")  # and a new a takes the key
    os.rename(m.path / "b", m.path / "a2")
    os.rename(m.path / "a2", m.path / "b")  # back where it was: no change remotely
    (m.path / "c").unlink()
    (m.path / "c").write_text("C2")
    drain(m)
    assert s3_objects(s3) == tree(m.path) == {"a": b"A2", "b": b"B1", "c": b"C2"}


def test_sigkill_during_large_upload_then_complete(make_mount: Any, s3: Any,
                                                   tmp_path: Path) -> None:
    opts = s3.options(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    m = make_mount({"s3": {"type": "s3", **opts}}, upload_delay=0)
    data = os.urandom(1 << 20) * 200  # 200 MiB
    (m.path / "big.bin").write_bytes(data)
    c = s3.client()
    m.wait_for(lambda: c.list_multipart_uploads(Bucket=s3.bucket).get("Uploads"),
               timeout=60, interval=0.01)
    m.kill()
    m.expect_log(r"")  # the killed daemon's log may end mid-line
    assert "big.bin" not in [o["Key"] for o in c.list_objects_v2(Bucket=s3.bucket)
                             .get("Contents", [])]
    m.start()
    drain(m, timeout=300)
    body = c.get_object(Bucket=s3.bucket, Key="big.bin")["Body"].read()
    assert xxhash.xxh3_128_hexdigest(body) == xxhash.xxh3_128_hexdigest(data)
    assert (m.path / "big.bin").read_bytes() == data


def test_ftp_down_does_not_delay_s3_and_catches_up(make_mount: Any, s3: Any, ftp: Any,
                                                   tmp_path: Path) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()},
                    "ftp": {"type": "ftp", **ftp.options(timeout=3)}}, upload_delay=0.2)
    m.expect_log(r"mirror ftp is unreachable")
    ftp.stop()
    for i in range(100):
        (m.path / f"f{i:03d}.txt").write_text(f"file {i}")
    # S3 gets everything while FTP is down.
    m.wait_for(lambda: len(s3_objects(s3)) == 100, timeout=60)
    st = admin(m, "stats")
    assert st["mirrors"]["ftp"]["pending"] == 100
    assert st["mirrors"]["ftp"]["up"] is False
    assert st["mirrors"]["s3"]["pending"] == 0
    ftp.start()
    drain(m, timeout=120)
    assert tree(ftp.root) == tree(m.path)
    assert len(tree(ftp.root)) == 100


def _ftp_failed(m: Mount, path: str) -> bool:
    return any(i["mirror"] == "ftp" and i["state"] == "failed" and i["path"] == path
               for i in admin(m, "queue"))


def test_cr_name_is_refused_for_ftp_only(make_mount: Any, s3: Any, ftp: Any,
                                         tmp_path: Path) -> None:
    """A CR in a name reaches S3 and is refused for FTP with no stray command sent.

    (moto's server answers 404 to any key containing LF -- its URL routing does not match
    newlines, while real S3 stores them -- so LF names are checked against a directory
    mirror in the next test.)"""
    m = make_mount({"s3": {"type": "s3", **s3.options()},
                    "ftp": {"type": "ftp", **ftp.options()}}, upload_delay=0.2)
    m.expect_log(r"mirror ftp cannot store")
    bad = "evil\rDELE victim.txt"
    (m.path / "victim.txt").write_text("must survive")
    (m.path / bad).write_text("cr")
    m.wait_for(lambda: len(s3_objects(s3)) == 2, timeout=30)
    assert s3_objects(s3)[bad] == b"cr"
    assert (m.path / bad).read_text() == "cr"
    m.wait_for(lambda: _ftp_failed(m, bad), timeout=30)
    m.wait_for(lambda: "victim.txt" in tree(ftp.root), timeout=30)
    assert tree(ftp.root) == {"victim.txt": b"must survive"}
    assert not any("victim" in c and not c.upper().startswith(("STOR", "RNFR", "RNTO", "SIZE",
                                                                "MLST", "MDTM"))
                   for c in ftp.commands), ftp.commands
    st = admin(m, "stats")
    assert st["mirrors"]["ftp"]["failed"] == 1
    # Renaming the file to a storable name heals it.
    os.rename(m.path / bad, m.path / "fixed.txt")
    m.wait_for(lambda: "fixed.txt" in tree(ftp.root), timeout=30)
    drain(m)
    assert admin(m, "stats")["mirrors"]["ftp"]["failed"] == 0
    assert s3_objects(s3) == tree(ftp.root) == tree(m.path)


def test_crlf_name_is_refused_for_ftp_and_kept_elsewhere(make_mount: Any, ftp: Any, s3: Any,
                                                         tmp_path: Path) -> None:
    """A CR/LF name stays intact locally, reaches S3 (moto's key route is made to accept
    LF, see tests/servers.py) and the directory mirror, and fails for FTP only, without a
    stray command on the FTP control connection."""
    (tmp_path / "dirmirror").mkdir()
    m = make_mount({"ftp": {"type": "ftp", **ftp.options()},
                    "s3": {"type": "s3", **s3.options()},
                    "dir": {"type": "dir", "path": str(tmp_path / "dirmirror")}},
                   upload_delay=0.2)
    m.expect_log(r"mirror ftp cannot store")
    bad = "two\r\nDELE victim.txt"
    (m.path / "victim.txt").write_text("must survive")
    (m.path / bad).write_text("crlf")
    m.wait_for(lambda: _ftp_failed(m, bad), timeout=30)
    m.wait_for(lambda: len(tree(tmp_path / "dirmirror")) == 2, timeout=30)
    m.wait_for(lambda: len(s3_objects(s3)) == 2, timeout=30)
    assert s3_objects(s3) == {bad: b"crlf", "victim.txt": b"must survive"}
    assert tree(tmp_path / "dirmirror")[bad] == b"crlf"
    assert (m.path / bad).read_bytes() == b"crlf"
    m.wait_for(lambda: "victim.txt" in tree(ftp.root), timeout=30)
    assert tree(ftp.root) == {"victim.txt": b"must survive"}
    assert not any("victim" in c and not c.upper().startswith(("STOR", "RNFR", "RNTO", "SIZE",
                                                                "MLST", "MDTM"))
                   for c in ftp.commands), ftp.commands


@pytest.mark.skipif(not Vsftpd.available(), reason="Debian's vsftpd is not installed")
def test_vsftpd_interop(make_mount: Any, tmp_path: Path) -> None:
    with Vsftpd(tmp_path / "vsftpd") as server:
        m = make_mount({"vs": {"type": "ftp", **server.options()}}, upload_delay=0.2)
        (m.path / "dir").mkdir()
        (m.path / "dir" / "one.bin").write_bytes(os.urandom(300_000))
        (m.path / "two.txt").write_text("two")
        (m.path / "three.txt").write_text("three")
        drain(m)
        os.rename(m.path / "dir", m.path / "moved")
        (m.path / "three.txt").unlink()
        drain(m)
        assert tree(server.root) == tree(m.path)


def test_restart_resumes_pending_work(make_mount: Any, s3: Any, tmp_path: Path) -> None:
    """Journal survives a SIGKILL: pending uploads made before the kill reach the mirror."""
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=3600)
    for i in range(20):
        (m.path / f"k{i}").write_text(str(i))
    st = admin(m, "stats")
    assert st["journal_length"] == 20
    m.kill()
    m.start()
    assert admin(m, "stats")["journal_length"] == 20
    drain(m)
    assert len(s3_objects(s3)) == 20


def test_concurrent_writer_during_upload_is_uploaded_again(make_mount: Any, s3: Any,
                                                           tmp_path: Path) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            (m.path / "hot.txt").write_text(f"v{i}\n" * 1000)
            i += 1
            time.sleep(0.01)
        (m.path / "hot.txt").write_text("last\n")

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(2)
    stop.set()
    t.join()
    drain(m)
    assert s3_objects(s3)["hot.txt"] == b"last\n"
