"""Issue 5: the admin commands on a running mount and offline, and system-style mounting."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.mountutil import REPO, is_mounted, write_config
from tests.registry_builder import build
from tests.test_cache import drop_caches
from tests.test_mirrors import CLI, admin, drain, s3_objects, tree

MiB = 1 << 20


def run(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO,
                       timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"mirrorfs {' '.join(args)}: {r.returncode} {r.stderr}")
    return r


def s3m(s3: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "s3", **s3.options(**extra)}


def test_stats_online_and_offline(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3m(s3)}, upload_delay=3600)
    t0 = time.time()
    (m.path / "a").write_bytes(b"x" * 1000)
    (m.path / "d").mkdir()
    (m.path / "d" / "b").write_bytes(b"y" * 500)
    st = admin(m, "stats")
    t1 = time.time()
    assert (st["files"], st["dirs"], st["bytes"]) == (2, 2, 1500)
    assert (st["dirty_files"], st["dirty_bytes"], st["journal_length"]) == (2, 1500, 2)
    s = st["mirrors"]["s3"]
    assert (s["pending"], s["failed"], s["uploaded"], s["up"]) == (2, 0, 0, True)
    assert s["oldest_pending_age"] is not None and 0 <= s["oldest_pending_age"] <= t1 - t0 + 1e-3
    human = run("stats", "-c", str(m.config), check=True).stdout
    assert "dirty" in human and "s3" in human and "pending" in human
    drain(m)
    st = admin(m, "stats")
    assert st["mirrors"]["s3"]["uploaded"] == 2 and st["journal_length"] == 0
    assert st["mirrors"]["s3"]["last_success"] >= int(t0)  # whole seconds
    prom = run("stats", "--prometheus", "-c", str(m.config), check=True).stdout
    assert "mirrorfs_files 2.0" in prom
    assert 'mirrorfs_mirror_uploaded{mirror="s3"} 2.0' in prom
    m.umount()
    off = admin(m, "stats")  # no daemon: read from LMDB directly
    assert off["online"] is False
    assert (off["files"], off["bytes"], off["mirrors"]["s3"]["uploaded"]) == (2, 1500, 2)
    text = m.config.parent / "metrics.prom"
    run("stats", "--prometheus", "--textfile", str(text), "-c", str(m.config), check=True)
    assert "mirrorfs_bytes 1500.0" in text.read_text()


def test_queue_retry_pause_resume(make_mount: Any, s3: Any, ftp: Any) -> None:
    m = make_mount({"s3": s3m(s3), "ftp": {"type": "ftp", **ftp.options()}},
                   upload_delay=0.2)
    m.expect_log(r"mirror ftp cannot store")
    admin(m, "pause", "s3")
    (m.path / "bad\rname").write_text("x")
    (m.path / "ok.txt").write_text("ok")
    m.wait_for(lambda: any(i["state"] == "failed" for i in admin(m, "queue")), timeout=30)
    q = admin(m, "queue")
    failed = [i for i in q if i["state"] == "failed"]
    assert failed[0]["mirror"] == "ftp" and "CR" in failed[0]["error"]
    assert {i["path"] for i in q if i["mirror"] == "s3"} == {"bad\rname", "ok.txt"}
    time.sleep(1.0)
    assert s3_objects(s3) == {}  # paused
    st = admin(m, "stats")
    assert st["mirrors"]["s3"]["paused"] is True and st["mirrors"]["s3"]["pending"] == 2
    admin(m, "resume", "s3")
    m.wait_for(lambda: len(s3_objects(s3)) == 2, timeout=30)
    r = admin(m, "retry", "ftp")
    assert r["retried"] == 1
    m.wait_for(lambda: admin(m, "stats")["mirrors"]["ftp"]["failed"] == 1, timeout=30)
    assert run("pause", "nosuch", "-c", str(m.config)).returncode == 2  # bad usage


def test_move_pin_unpin_evict_state_url_xattrs(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3m(s3, url_base="https://cdn.example.com/media")},
                   upload_delay=3600, xattrs=True)
    d = m.path / "lib"
    d.mkdir()
    files = {f"f{i}": os.urandom(100_000) for i in range(5)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    assert os.getxattr(d / "f0", "user.mirrorfs.state") == b"dirty"
    r = admin(m, "move", "--to-remote", str(d))
    assert r["evicted"] == 5 and not r["kept"]
    st = admin(m, "state", str(d / "f0"))
    assert st["lib/f0"]["state"] == "remote-only"
    assert os.getxattr(d / "f0", "user.mirrorfs.state") == b"remote-only"
    assert admin(m, "stats")["remote_only_files"] == 5
    drop_caches()
    r = admin(m, "move", "--to-local", str(d))
    assert r["downloaded"] == 5 and r["pinned"] == 5
    for name, data in files.items():
        assert (d / name).read_bytes() == data
    assert admin(m, "evict", str(d / "f1"))["kept"] == ["lib/f1"]  # pinned
    admin(m, "unpin", str(d / "f1"))
    assert admin(m, "evict", str(d / "f1"))["evicted"] == 1
    admin(m, "pin", str(d / "f2"))
    assert admin(m, "evict", "--force", str(d / "f2"))["evicted"] == 1
    url = run("url", str(d / "f3"), "-c", str(m.config), check=True).stdout.strip()
    assert url == "https://cdn.example.com/media/lib/f3"
    assert os.getxattr(d / "f3", "user.mirrorfs.url.s3").decode() == url
    assert "user.mirrorfs.state" in os.listxattr(d / "f3")


def _interrupt_after_progress(args: list[str]) -> None:
    """Run an admin command and SIGINT it once it reported progress (as Ctrl-C would).

    The command gets the default SIGINT disposition: run in the background of a
    non-interactive shell (``.ci/run &``, nohup), the tests inherit SIGINT ignored, and so
    would the command, which then ran to the end."""
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stderr is not None
    line = p.stderr.readline()
    assert line, "no progress reported"
    p.send_signal(signal.SIGINT)
    p.wait(60)


def test_backfill_interrupted_and_rerun(make_mount: Any, s3: Any, tmp_path: Path) -> None:
    m = make_mount({"a": s3m(s3)}, upload_delay=0)
    for i in range(300):
        (m.path / f"f{i:03d}").write_text(f"file {i}")
    drain(m)
    a_uploads = admin(m, "stats")["mirrors"]["a"]["uploads"]
    m.umount()
    second = s3.bucket + "-new"
    s3.create_bucket(second)
    write_config(m.config, {"cache_dir": str(m.config.parent / "cache"), "upload_delay": 0},
                 {"a": s3m(s3), "b": s3m(s3, bucket=second)})
    m.start()
    s3.start_recording()
    # backfill queues in batches and lets the mirror catch up between them
    _interrupt_after_progress(["backfill", "b", "--batch", "10", "-c", str(m.config)])
    st = admin(m, "stats")["mirrors"]["b"]
    partial = st["pending"] + st["uploads"]
    assert 0 < partial < 300, partial
    r = admin(m, "backfill", "b", "--batch", "10")
    assert r["resumed"] is True
    drain(m)
    puts = [p for meth, p in s3.recorded() if meth == "PUT" and p.startswith(f"/{second}/")]
    assert len(set(puts)) == 300, [p for p in sorted(set(puts)) if "/f" not in p][:20]
    assert len(puts) == 300, [p for p in puts if puts.count(p) > 1][:20]
    c = s3.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=second, MaxKeys=1000)["Contents"]]
    assert len(keys) == 300
    assert admin(m, "stats")["mirrors"]["a"]["uploads"] == a_uploads  # a was not touched


def test_import_interrupted_and_rerun(make_mount: Any, s3: Any, tmp_path: Path) -> None:
    c = s3.client()
    objs = {f"photos/{i:03d}.jpg": os.urandom(2000 + i) for i in range(150)}
    for key, data in objs.items():
        meta = {"mirrorfs-xxh3": xxhash.xxh3_128_hexdigest(data),
                "mirrorfs-size": str(len(data))} if len(key) % 2 else {}
        c.put_object(Bucket=s3.bucket, Key=key, Body=data, Metadata=meta)
    for bad in ("../escape", "a//b", "./dot", "x/../../y"):
        c.put_object(Bucket=s3.bucket, Key=bad, Body=b"bad")
    m = make_mount({"s3": s3m(s3)}, upload_delay=0)
    m.expect_log(r"cannot be a path in the mount")
    _interrupt_after_progress(["import", "s3", "--batch", "20", "-c", str(m.config)])
    partial = admin(m, "stats")["files"]
    assert 0 < partial < 150, partial
    r = admin(m, "import", "s3", "--batch", "20", check=False)  # exit 1: bad keys skipped
    assert r["resumed"] is True
    st = admin(m, "stats")
    assert st["files"] == 150 and st["remote_only_files"] == 150
    # a rerun from scratch finds everything already there: nothing duplicated
    r = admin(m, "import", "s3", check=False)
    assert r["added"] == 0 and r["exists"] == 150 and r["rejected"] == 4
    assert {s["key"] for s in r["skipped"]} == {"../escape", "a//b", "./dot", "x/../../y"}
    assert admin(m, "stats")["files"] == 150
    for key, data in list(objs.items())[:20]:
        assert (m.path / key).read_bytes() == data
    assert not (m.config.parent / "escape").exists()
    assert sorted(os.listdir(m.path)) == ["photos"]


def test_verify_local_and_remote_with_repair(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3m(s3)}, upload_delay=0)
    m.expect_log(r"does not match its xxhash")
    m.expect_log(r"verify: copy of")
    m.expect_log(r"was changed behind our back|is missing \(the mirror lost it\)")
    data = os.urandom(300_000)
    (m.path / "v1").write_bytes(data)
    (m.path / "v2").write_bytes(b"second" * 1000)
    drain(m)
    r = admin(m, "verify")
    assert sorted(r["ok"]) == ["v1", "v2"] and "corrupt" not in r
    # corrupt the cached copy behind the filesystem's back
    content = next(p for p in (m.config.parent / "cache" / "data").rglob("*")
                   if p.is_file() and p.stat().st_size == len(data))
    with open(content, "r+b") as f:
        f.seek(1000)
        f.write(b"\0garbage\0")
    r = admin(m, "verify", check=False)  # exit status 1: problems found
    assert r["corrupt"] == ["v1"]
    r = admin(m, "verify", "--repair", check=False)
    assert r["repaired"] == ["v1"]
    drop_caches()
    assert (m.path / "v1").read_bytes() == data
    # a missing and a wrong mirror copy
    c = s3.client()
    c.delete_object(Bucket=s3.bucket, Key="v2")
    c.put_object(Bucket=s3.bucket, Key="v1", Body=b"wrong",
                 Metadata={"mirrorfs-xxh3": "0" * 32})
    r = admin(m, "verify", "--remote", check=False)
    assert r["remote_missing"] == ["s3:v2"] and len(r["remote_bad"]) == 1
    r = admin(m, "verify", "--remote", "--deep", "--repair", check=False)
    assert len(r["repaired"]) == 2
    drain(m)
    assert s3_objects(s3) == {"v1": data, "v2": b"second" * 1000}
    assert "remote_bad" not in admin(m, "verify", "--remote", "--deep")


def test_check_config_and_mount_probe(make_mount: Any, s3: Any, ftp: Any,
                                      tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.toml", {"cache_dir": str(tmp_path / "c1")},
                        {"s3": s3m(s3), "ftp": {"type": "ftp", **ftp.options()}})
    r = run("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert "mirror s3 (s3): ok" in r.stdout and "mirror ftp (ftp): ok" in r.stdout
    ftp.stop()
    r = run("check-config", str(good))
    assert r.returncode == 1 and "mirror ftp (ftp): UNREACHABLE" in r.stdout
    # an unreachable mirror is a warning at mount time: it may come back
    m = make_mount({"ftp": {"type": "ftp", **ftp.options(timeout=2)}}, name="down")
    m.expect_log(r"unreachable at start")
    assert admin(m, "stats")["mirrors"]["ftp"]["up"] is False
    # a missing bucket is a config error: mount refuses with status 2
    bad = make_mount({"s3": s3m(s3, bucket="no-such-bucket-here")}, name="bad", start=False)
    bad.path.mkdir()
    r = run("mount", "--foreground", str(bad.config), str(bad.path), timeout=60)
    assert r.returncode == 2 and "no-such-bucket-here" in r.stderr
    assert not is_mounted(bad.path)


def test_umount_reports_and_waits(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3m(s3)}, upload_delay=3600)
    m.proc = None  # `mirrorfs umount` stops it; the fixture must not
    (m.path / "pending.bin").write_bytes(os.urandom(MiB))
    mp = m.path
    r = subprocess.run([*CLI, "umount", "--wait", "--timeout", "60", str(mp)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    assert "pending.bin" in s3_objects(s3)


def test_umount_without_wait_tells_what_is_pending(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3m(s3)}, upload_delay=3600)
    proc = m.proc
    m.proc = None
    (m.path / "p1").write_text("1")
    (m.path / "p2").write_text("2")
    r = run("umount", str(m.path))
    assert r.returncode == 0
    assert "2 files" in r.stderr and "not on every mirror" in r.stderr
    assert proc is not None and proc.wait(30) == 0
    m.start()
    assert admin(m, "stats")["journal_length"] == 2  # still queued


def test_sigterm_finishes_inflight_and_keeps_the_rest(make_mount: Any, tmp_path: Path) -> None:
    """SIGTERM while an upload is in flight (a slow FTP server, one transfer at a time): that
    upload completes and is recorded, nothing new starts, the rest stays queued for the next
    mount, and the daemon unmounts and exits 0."""
    from tests.servers import PyFtpd

    with PyFtpd(tmp_path / "slow-ftp", read_limit=256 * 1024) as slow:  # 1 MiB: ~4 s
        m = make_mount({"slow": {"type": "ftp", **slow.options(), "concurrency": 1}},
                       upload_delay=0)
        files = {f"f{i}.bin": os.urandom(MiB) for i in range(3)}
        for name, data in files.items():
            (m.path / name).write_bytes(data)

        def in_flight() -> str | None:
            paths = [j["path"] for j in admin(m, "queue") if j["state"] == "in flight"]
            return paths[0] if paths else None

        first = m.wait_for(in_flight, timeout=30)
        assert m.terminate() == 0
        assert not is_mounted(m.path)
        assert "received SIGTERM" in m.log_text()
        assert tree(slow.root) == {first: files[first]}
        left = admin(m, "queue")  # offline, from LMDB
        assert sorted(j["path"] for j in left) == sorted(set(files) - {first}), left
        m.start()
        drain(m)
        assert tree(slow.root) == files


def test_drain_timeout_and_json(make_mount: Any, ftp: Any) -> None:
    m = make_mount({"ftp": {"type": "ftp", **ftp.options(timeout=2)}}, upload_delay=0)
    m.expect_log(r"unreachable")
    ftp.stop()
    (m.path / "stuck").write_text("s")
    r = run("drain", "--timeout", "2", "--json", "-c", str(m.config))
    assert r.returncode == 1
    assert json.loads(r.stdout)["drained"] is False
    ftp.start()
    drain(m)


def test_stats_reads_counters_not_the_tree(tmp_path: Path) -> None:
    """What makes `stats` cost the same on a million files: it reads the counters kept with
    every change and walks nothing. A registry of 2,000 files (built directly, not through the
    mount) whose files/bytes counters are then set to other figures: stats reports those."""
    from mirrorfs.cache.db import Database, set_counter

    cache = tmp_path / "cache"
    build(str(cache), 2000)
    cfg = write_config(tmp_path / "big.toml", {"cache_dir": str(cache)},
                       {"s3": {"type": "dir", "path": str(tmp_path)}})
    st = json.loads(run("stats", "--json", "-c", str(cfg), check=True).stdout)
    assert (st["files"], st["bytes"], st["mirrors"]["s3"]["uploaded"]) == (2000, 2_000_000, 2000)
    db = Database(str(cache / "meta"))
    try:
        with db.begin(write=True) as txn:
            counters = db.db["counters"]
            set_counter(txn, counters, b"files", 1_000_000)
            set_counter(txn, counters, b"bytes", 10**9)
        db.flush()
    finally:
        db.close()
    st = json.loads(run("stats", "--json", "-c", str(cfg), check=True).stdout)
    assert (st["files"], st["bytes"], st["remote_only_files"]) == (1_000_000, 10**9, 1_000_000)


@pytest.mark.perf
def test_stats_on_a_million_files_is_fast(tmp_path: Path) -> None:
    """The registry is built directly (not through the mount); stats reads counters only."""
    cache = tmp_path / "cache"
    build(str(cache), 1_000_000)
    cfg = write_config(tmp_path / "big.toml", {"cache_dir": str(cache)},
                       {"s3": {"type": "dir", "path": str(tmp_path)}})
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        r = run("stats", "--json", "-c", str(cfg), check=True)
        best = min(best, time.monotonic() - t0)
    st = json.loads(r.stdout)
    assert st["files"] == 1_000_000 and st["mirrors"]["s3"]["uploaded"] == 1_000_000
    print(f"stats on 1M files: {best:.3f}s (whole command, offline)")
    assert best < 1.0


NAMESPACED_MOUNTS = r"""
set -eu
# In a private mount namespace (unshare -m): the host's /sbin is hidden under a tmpfs that
# holds only our helper, and every mount here vanishes with the namespace.
sbin=$(realpath /sbin)
mount -t tmpfs -o mode=755 mirrorfs-test "$sbin"
cp "$ROOT/sbin/mount.fuse.mirrorfs" "$sbin/"
trap 'fusermount3 -u -z "$MP" 2>/dev/null || true' EXIT
mounted() { grep -q " $MP fuse.mirrorfs " /proc/self/mounts; }
mount -t fuse.mirrorfs "$CFG" "$MP" -o allow_other,_netdev
mounted
echo hello > "$MP/via-mount"
test "$(cat "$MP/via-mount")" = hello
grep " $MP " /proc/self/mounts | grep -q allow_other
umount "$MP"
! mounted
flock -w 60 "$CACHE/lock" true  # the daemon let go of the cache directory
mount -T "$FSTAB" "$MP"
mounted
test "$(cat "$MP/via-mount")" = hello
if (echo x > "$MP/new") 2>/dev/null; then echo "the ro mount took a write"; exit 1; fi
"$ROOT/usr/local/bin/mirrorfs" umount "$MP"
! mounted
echo NAMESPACE-OK
"""


def _host_helper() -> bytes | None:
    try:
        return open("/sbin/mount.fuse.mirrorfs", "rb").read()
    except FileNotFoundError:
        return None


def test_mount_t_and_fstab(tmp_path: Path, s3: Any) -> None:
    """mount -t and an fstab line through the installed helper and command, in a private
    mount namespace: the host's /sbin is not touched (it used to get a helper pointing into
    this clone)."""
    before = _host_helper()
    root = tmp_path / "root"
    run("install", "--root", str(root), check=True)
    cfg = write_config(tmp_path / "sys.toml", {"cache_dir": str(tmp_path / "cache"),
                                               "upload_delay": 0}, {"s3": s3m(s3)})
    mp = tmp_path / "mnt"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{cfg} {mp} fuse.mirrorfs defaults,_netdev,ro 0 0\n")
    env = {**os.environ, "ROOT": str(root), "CFG": str(cfg), "MP": str(mp),
           "FSTAB": str(fstab), "CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        NAMESPACED_MOUNTS], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0 and "NAMESPACE-OK" in r.stdout, (r.stdout, r.stderr)
    assert _host_helper() == before  # the host is as it was
    assert not is_mounted(mp)
    assert "via-mount" in s3_objects(s3)  # uploaded by the namespaced daemon


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    units = REPO / "tools" / "systemd"
    for unit in units.iterdir():
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True)
        problems = [ln for ln in r.stderr.splitlines()
                    if "mirrorfs" in ln and "Command" not in ln and "not executable" not in ln]
        assert not problems, r.stderr


def test_systemd_unit_files_are_well_formed() -> None:
    svc = (REPO / "tools" / "systemd" / "mirrorfs@.service").read_text()
    assert "Type=notify" in svc and "mount --foreground" in svc
    mnt = (REPO / "tools" / "systemd" / "srv-media.mount").read_text()
    assert "Type=fuse.mirrorfs" in mnt and "Where=/srv/media" in mnt


def test_notify_socket_gets_ready_and_stopping(make_mount: Any, tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    m = make_mount(env={"NOTIFY_SOCKET": path})
    assert sock.recv(100) == b"READY=1"
    m.terminate()
    assert sock.recv(100) == b"STOPPING=1"





def test_example_config_documents_every_key_and_parses(tmp_path: Path) -> None:
    from mirrorfs.config import COMMON_MIRROR, MIRROR_OPTIONS, TOP_OPTIONS, load_config

    text = (REPO / "mirrorfs.conf.example").read_text()
    for key in [*TOP_OPTIONS, *COMMON_MIRROR, *(k for o in MIRROR_OPTIONS.values() for k in o)]:
        assert f"{key} =" in text or key == "mirrors", key
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    cfg = tmp_path / "example.toml"
    cfg.write_text(text.replace("/etc/mirrorfs/s3.secret", str(secret))
                   .replace("/etc/mirrorfs/ftp.secret", str(secret)))
    c = load_config(str(cfg))
    assert [m.type for m in c.mirrors] == ["s3", "ftp", "dir"]
    assert c.mirrors[0].options["secret_access_key"] == "s3cr3t"
