"""Issue 15: mirrors you can prove. After any crash every mirror equals the mount once
drained; mirrorfs notices by itself when a mirror does not.

The deterministic crash tests put a SIGKILL exactly into one window of a multi-step remote
operation through a test-only seam: with ``MIRRORFS_TEST_CRASH_AT=<point>`` in its
environment the daemon kills itself when it reaches that point (``mirrorfs/seams.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.mountutil import REPO, Mount, kill_with_workload, lazy_unmount
from tests.servers import bucket_objects as s3_tree
from tests.test_mirrors import CLI, admin, drain, tree


def three_mirrors(tmp_path: Path, s3: Any, ftp: Any) -> dict[str, dict[str, Any]]:
    (tmp_path / "dm").mkdir(exist_ok=True)
    return {"s3": {"type": "s3", **s3.options()},
            "ftp": {"type": "ftp", **ftp.options()},
            "dir": {"type": "dir", "path": str(tmp_path / "dm")}}


def all_temps(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _dirs, files in os.walk(root) for f in files
            if f.startswith(".mirrorfs-tmp-")]


def assert_mirrors_equal(m: Mount, tmp_path: Path, s3: Any, ftp: Any | None) -> None:
    """Every mirror holds exactly the mount's files, byte for byte (no missing, no stray,
    no stale object, no temp file)."""
    local = tree(m.path)
    assert tree(tmp_path / "dm") == local, "dir mirror differs"
    assert s3_tree(s3) == local, "S3 differs"
    assert not all_temps(tmp_path / "dm"), all_temps(tmp_path / "dm")
    if ftp is not None:
        assert tree(ftp.root) == local, "FTP differs"
        assert not all_temps(ftp.root), all_temps(ftp.root)


def wait_dead(m: Mount, timeout: float = 60) -> None:
    """The daemon killed itself at its crash point: reap it and clear the dead mount."""
    assert m.proc is not None
    m.proc.wait(timeout)
    m.proc = None
    lazy_unmount(m.path)


def start_paused(m: Mount) -> None:
    """Restart without the crash seam and with uploads paused, so that the test can change
    the file before the interrupted job runs again."""
    m.env = None
    m.config.write_text("paused = true\n" + m.config.read_text())
    m.start()


@pytest.mark.parametrize("point", ["put-done", "upload-recorded", "s3-copied", "rename-done"])
def test_kill_inside_a_multistep_operation_leaves_nothing_behind(
        make_mount: Any, s3: Any, ftp: Any, tmp_path: Path, point: str) -> None:
    """put-done: an upload reached the mirror and was not recorded; upload-recorded: a
    changed and renamed file's new key is recorded and its old key not yet deleted;
    s3-copied: S3's server-side rename copied the object and did not delete the source;
    rename-done: a server-side rename happened and was not recorded. After the restart the
    file is renamed once more; then every mirror must equal the mount."""
    m = make_mount(three_mirrors(tmp_path, s3, ftp), upload_delay=0,
                   env={"MIRRORFS_TEST_CRASH_AT": point})
    data = os.urandom(300_000)
    if point == "put-done":
        (m.path / "a.txt").write_bytes(data)  # its first upload kills the daemon
    else:
        (m.path / "a.txt").write_bytes(data)
        drain(m)
        os.rename(m.path / "a.txt", m.path / "b.txt")
        if point == "upload-recorded":  # changed too: uploaded again, not renamed remotely
            with open(m.path / "b.txt", "ab") as f:
                f.write(b"more")
            data += b"more"
    wait_dead(m)
    assert "test seam: SIGKILL at " + point in m.log_text()
    start_paused(m)
    name = "a.txt" if point == "put-done" else "b.txt"
    os.rename(m.path / name, m.path / "c.txt")
    admin(m, "resume")
    drain(m)
    assert (m.path / "c.txt").read_bytes() == data
    assert_mirrors_equal(m, tmp_path, s3, ftp)
    st = admin(m, "stats")
    assert st["journal_length"] == 0, st


@pytest.mark.parametrize("point", ["put-done", "s3-copied", "rename-done"])
def test_kill_inside_a_multistep_operation_then_delete(
        make_mount: Any, s3: Any, tmp_path: Path, point: str) -> None:
    """The same windows, with the file deleted after the restart: a delete must reach what
    the cut operation left on the mirror (before, the unrecorded object stayed for good)."""
    (tmp_path / "dm").mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options()},
                    "dir": {"type": "dir", "path": str(tmp_path / "dm")}}, upload_delay=0,
                   env={"MIRRORFS_TEST_CRASH_AT": point})
    (m.path / "a.txt").write_bytes(os.urandom(5000))
    if point != "put-done":
        drain(m)
        os.rename(m.path / "a.txt", m.path / "b.txt")
    wait_dead(m)
    start_paused(m)
    os.unlink(m.path / ("a.txt" if point == "put-done" else "b.txt"))
    admin(m, "resume")
    drain(m)
    assert_mirrors_equal(m, tmp_path, s3, None)
    assert tree(tmp_path / "dm") == {}


# ---------------------------------------------------------------------- temp objects


def test_temps_of_cut_transfers_are_removed_at_start(make_mount: Any, s3: Any, ftp: Any,
                                                     tmp_path: Path) -> None:
    """What a crash leaves of transfers in flight: temp files on the directory and FTP
    mirrors (another process's name mark), an incomplete multipart upload on S3. Gone once
    the mount has started and drained; a temp file of someone else's (another prefix) and
    our own objects stay."""
    mirrors = three_mirrors(tmp_path, s3, ftp)
    (tmp_path / "dm" / "sub").mkdir(parents=True)
    for root in (tmp_path / "dm", Path(ftp.root)):
        (root / "sub").mkdir(parents=True, exist_ok=True)
        (root / ".mirrorfs-tmp-0badc0de-0123456789abcdef").write_bytes(b"x" * 1000)
        (root / "sub" / ".mirrorfs-tmp-0badc0de-fedcba9876543210").write_bytes(b"y" * 100)
        (root / "sub" / "other.tmp").write_bytes(b"not ours")
    c = s3.client()
    up = c.create_multipart_upload(Bucket=s3.bucket, Key="big.bin")
    c.upload_part(Bucket=s3.bucket, Key="big.bin", UploadId=up["UploadId"], PartNumber=1,
                  Body=b"z" * (5 << 20))
    m = make_mount(mirrors, upload_delay=0)
    (m.path / "sub").mkdir()
    (m.path / "sub" / "other.tmp").write_bytes(b"not ours")
    drain(m)
    # no upload of ours was cut here: the first audit (at the first start) finds them
    m.wait_for(lambda: not all_temps(tmp_path / "dm") and not all_temps(Path(ftp.root)))
    assert (tmp_path / "dm" / "sub" / "other.tmp").read_bytes() == b"not ours"
    assert c.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    m.wait_for(lambda: all(v["audit_runs"] for v in admin(m, "stats")["mirrors"].values()))
    st = admin(m, "stats")["mirrors"]
    assert {n: st[n]["temps_removed"] for n in st} == {"s3": 1, "ftp": 2, "dir": 2}, st


# ---------------------------------------------------------------------- drain and delays


def test_drain_and_umount_wait_keep_delayed_deletes(make_mount: Any, tmp_path: Path) -> None:
    (tmp_path / "dm").mkdir()
    m = make_mount({"dir": {"type": "dir", "path": str(tmp_path / "dm"),
                            "delete_policy": "delayed", "delete_delay": 3600}},
                   upload_delay=3600)
    (m.path / "keep.txt").write_bytes(b"k")
    (m.path / "gone.txt").write_bytes(b"g")
    drain(m)
    assert tree(tmp_path / "dm") == {"keep.txt": b"k", "gone.txt": b"g"}
    os.unlink(m.path / "gone.txt")
    (m.path / "new.txt").write_bytes(b"n")  # due in an hour: drain sends it now
    r = admin(m, "drain", "--timeout", "60")
    assert r["drained"] and r["held_deletes"] == 1, r
    assert tree(tmp_path / "dm") == {"keep.txt": b"k", "gone.txt": b"g", "new.txt": b"n"}
    assert admin(m, "stats")["mirrors"]["dir"]["delayed_deletes"] == 1
    proc = m.proc
    m.proc = None
    r2 = subprocess.run([*CLI, "umount", "--wait", "--timeout", "60", str(m.path)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert proc is not None and proc.wait(30) == 0
    assert tree(tmp_path / "dm") == {"keep.txt": b"k", "gone.txt": b"g", "new.txt": b"n"}
    m.start()
    r = admin(m, "drain", "--deletes", "--timeout", "60")
    assert r["drained"] and r["held_deletes"] == 0, r
    assert tree(tmp_path / "dm") == {"keep.txt": b"k", "new.txt": b"n"}


# ---------------------------------------------------------------------- the audit


def wait_equal(m: Mount, read: Any, timeout: float = 60) -> None:
    """Poll until the mirror read by ``read()`` holds exactly the mount's files."""
    local = tree(m.path)
    m.wait_for(lambda: read() == local, timeout=timeout, interval=0.2)


@pytest.mark.parametrize("how", ["bucket-recreated", "dir-wiped"])
def test_audit_refills_an_emptied_mirror_by_itself(make_mount: Any, s3: Any, tmp_path: Path,
                                                   how: str) -> None:
    """A mirror that lost everything behind mirrorfs's back is refilled by the audit alone,
    with no command, within one audit_interval; a drain started meanwhile does not report
    success before the objects are back."""
    import shutil

    (tmp_path / "dm").mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options(), "audit_interval": 2},
                    "dir": {"type": "dir", "path": str(tmp_path / "dm"),
                            "audit_interval": 2}}, upload_delay=0)
    m.expect_log(r"is missing \(the mirror lost it\); uploading it again")
    files = {f"d{i % 2}/f{i}.bin": os.urandom(1000 + 5000 * i) for i in range(6)}
    for name, data in files.items():
        (m.path / name).parent.mkdir(exist_ok=True)
        (m.path / name).write_bytes(data)
    drain(m)
    mirror = "s3" if how == "bucket-recreated" else "dir"
    runs = admin(m, "stats")["mirrors"][mirror]["audit_runs"]
    if how == "bucket-recreated":
        c = s3.client()
        for key in list(s3_tree(s3)):
            c.delete_object(Bucket=s3.bucket, Key=key)
        c.delete_bucket(Bucket=s3.bucket)
        c.create_bucket(Bucket=s3.bucket)
        def read() -> dict[str, bytes]:
            return s3_tree(s3)
    else:
        for entry in os.scandir(tmp_path / "dm"):
            shutil.rmtree(entry.path)
        def read() -> dict[str, bytes]:
            return tree(tmp_path / "dm")
    # (no check that the mirror reads empty now: an audit due meanwhile may already refill it)
    # no command: the next audit finds the objects missing and queues them again ...
    m.wait_for(lambda: admin(m, "stats")["mirrors"][mirror]["audit_missing"] == len(files)
               or read() == files, timeout=60, interval=0.1)
    # ... and a drain does not say drained before they are back
    drain(m)
    assert read() == files
    st = admin(m, "stats")["mirrors"]
    assert st[mirror]["audit_runs"] > runs
    assert st[mirror]["audit_last"] is not None
    assert st["s3"]["audit_foreign"] == 0 and st["dir"]["audit_foreign"] == 0
    r = subprocess.run([*CLI, "verify", "--remote", "-c", str(m.config), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_audit_heals_deleted_truncated_and_replaced_objects(make_mount: Any, s3: Any,
                                                            tmp_path: Path) -> None:
    """One object deleted, one truncated, one replaced with other bytes of the same size,
    on S3 and on a directory mirror; a foreign object written with boto3 (and a foreign
    file in the directory) is reported and left alone; a stray copy of ours is deleted."""
    (tmp_path / "dm").mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options(), "audit_interval": 2},
                    "dir": {"type": "dir", "path": str(tmp_path / "dm"),
                            "audit_interval": 2}}, upload_delay=0)
    m.expect_log(r"is missing \(the mirror lost it\); uploading it again")
    m.expect_log(r"was changed behind our back")
    files = {name: os.urandom(20_000) for name in ("gone", "short", "other", "fine")}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
        os.utime(m.path / name, (1.6e9, 1.6e9))  # so that a change now shows in the mtime
    drain(m)
    c = s3.client()
    c.delete_object(Bucket=s3.bucket, Key="gone")
    c.put_object(Bucket=s3.bucket, Key="short", Body=files["short"][:100])
    c.put_object(Bucket=s3.bucket, Key="other", Body=os.urandom(20_000))
    c.put_object(Bucket=s3.bucket, Key="foreign.txt", Body=b"someone else's")
    c.copy_object(Bucket=s3.bucket, Key="stray", CopySource={"Bucket": s3.bucket,
                                                             "Key": "fine"})
    dm = tmp_path / "dm"
    (dm / "gone").unlink()
    with open(dm / "short", "r+b") as f:
        f.truncate(100)
    (dm / "other").write_bytes(os.urandom(20_000))  # in place: the xattr stays
    (dm / "foreign.txt").write_bytes(b"someone else's")
    want = {**files, "foreign.txt": b"someone else's"}
    def healed() -> bool:
        try:
            return s3_tree(s3) == want and tree(dm) == want
        except (OSError, c.exceptions.NoSuchKey):  # an object went while it was read
            return False

    m.wait_for(healed, timeout=60, interval=0.2)
    st = admin(m, "stats")["mirrors"]
    assert st["s3"]["audit_foreign"] == 1 and st["dir"]["audit_foreign"] == 1, st
    assert not (m.path / "foreign.txt").exists()
    r = admin(m, "verify", "--remote")
    assert r["remote_foreign"] == ["s3:foreign.txt", "dir:foreign.txt"], r
    assert not r.get("remote_missing") and not r.get("remote_bad"), r


def test_verify_deep_finds_a_lying_object_and_exits_non_zero(make_mount: Any,
                                                            s3: Any) -> None:
    """Other bytes of the same size with our metadata copied over: only reading the object
    shows it. `verify --remote --deep` must report it and exit 1 (it exited 0)."""
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    data = os.urandom(50_000)
    (m.path / "x").write_bytes(data)
    drain(m)
    c = s3.client()
    meta = c.head_object(Bucket=s3.bucket, Key="x")["Metadata"]
    c.put_object(Bucket=s3.bucket, Key="x", Body=os.urandom(50_000), Metadata=meta)
    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "verify", *args, "-c", str(m.config), "--json"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
    assert verify("--remote").returncode == 0
    r = verify("--remote", "--deep")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "s3:x" in r.stdout and "remote_bad" in r.stdout


# ---------------------------------------------------------------------- random kills

NAMES = [f"f{i}" for i in range(10)] + [f"d{j}/g{i}" for j in range(2) for i in range(5)]


def churn(mnt: Path, seed: int) -> None:
    """The forked workload: create, overwrite, append, truncate, rename and delete files
    (some of them multipart-sized on S3), paced so that with a 1 s upload delay uploads,
    renames and deletes are running at any moment. Runs until the mount goes away."""
    import random
    import time

    rng = random.Random(seed)
    while True:
        name = rng.choice(NAMES)
        p = mnt / name
        roll = rng.random()
        try:
            if roll < 0.3:
                size = 6 << 20 if rng.random() < 0.03 else rng.choice([0, 100, 70_000, 300_000])
                tmp = mnt / f"{name}.tmp"
                tmp.write_bytes(rng.randbytes(size))
                os.rename(tmp, p)
            elif roll < 0.45:
                with open(p, "ab") as f:
                    f.write(rng.randbytes(rng.randrange(1, 50_000)))
            elif roll < 0.55:
                with open(p, "r+b") as f:
                    f.truncate(rng.randrange(0, 100_000))
            elif roll < 0.8:
                os.rename(p, mnt / rng.choice(NAMES))
            else:
                os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            return  # the daemon is gone
        time.sleep(rng.uniform(0, 0.08))


def mirror_state(tmp_path: Path, s3: Any, ftp: Any) -> dict[str, dict[str, bytes]]:
    return {"s3": s3_tree(s3), "dir": tree(tmp_path / "dm"), "ftp": tree(ftp.root)}


def run_random_kills(make_mount: Any, s3: Any, ftp: Any, tmp_path: Path,
                     kills: int) -> None:
    import random
    import time

    seed = int(os.environ.get("MIRRORFS_PROOF_SEED") or random.randrange(1 << 32))
    print(f"random kills: seed {seed} (rerun with MIRRORFS_PROOF_SEED={seed}), {kills} kills")
    rng = random.Random(seed)
    mirrors = three_mirrors(tmp_path, s3, ftp)
    mirrors["s3"]["multipart_threshold"] = "5M"
    mirrors["s3"]["multipart_chunksize"] = "5M"
    m = make_mount(mirrors, upload_delay=1)
    for d in ("d0", "d1"):
        (m.path / d).mkdir()
    t0 = time.monotonic()
    for i in range(kills):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                churn(m.path, seed * 1000 + i)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.2, 1.2))
        kill_with_workload(m, pid)
        m.start()
        for entry in list(os.scandir(m.path)) + [e for d in ("d0", "d1")
                                                 for e in os.scandir(m.path / d)]:
            if entry.name.endswith(".tmp"):
                os.unlink(entry.path)
    spent = time.monotonic() - t0
    drain(m, timeout=300)
    local = tree(m.path)
    got = mirror_state(tmp_path, s3, ftp)
    report = {}
    for name, held in got.items():
        missing = sorted(set(local) - set(held))
        extra = sorted(set(held) - set(local))
        stale = sorted(k for k in set(local) & set(held) if held[k] != local[k])
        report[name] = (len(missing), len(extra), len(stale))
        assert not (missing or extra or stale), (
            f"seed {seed}: {name}: missing {missing}, extra {extra}, stale {stale}")
    temps = all_temps(tmp_path / "dm") + all_temps(Path(ftp.root))
    uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    text = m.log_text()
    settled = text.count("left by an unfinished")
    removed = sum(int(x) for x in re.findall(r"removed (\d+) temp object", text))
    print(f"{kills} kills in {spent:.1f}s; {len(local)} files; (missing, extra, stale) per "
          f"mirror {report}; temps {len(temps)}, incomplete uploads {len(uploads)}; "
          f"objects of cut operations removed after restarts: {settled}, temp objects and "
          f"incomplete uploads removed: {removed}")
    assert not temps and not uploads, (temps, uploads)
    assert admin(m, "stats")["journal_length"] == 0


def test_every_mirror_equals_the_mount_after_random_kills(make_mount: Any, s3: Any,
                                                          ftp: Any, tmp_path: Path) -> None:
    run_random_kills(make_mount, s3, ftp, tmp_path,
                     int(os.environ.get("MIRRORFS_PROOF_KILLS", "20")))


@pytest.mark.soak
def test_every_mirror_equals_the_mount_after_many_random_kills(
        make_mount: Any, s3: Any, ftp: Any, tmp_path: Path) -> None:
    run_random_kills(make_mount, s3, ftp, tmp_path,
                     int(os.environ.get("MIRRORFS_PROOF_KILLS", "100")))
