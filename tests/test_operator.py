"""Issue 18: what operators expect -- metrics, exit statuses, mount refusals, state that
survives a remount, installed units. Real mounts and servers throughout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.mountutil import REPO, Mount, is_mounted, lazy_unmount
from tests.servers import free_port
from tests.test_cli import wait_gone
from tests.test_mirrors import CLI, admin, drain

MiB = 1 << 20


def run(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, **kw)


# ----------------------------------------------------------------------------- metrics


def parse(text: str) -> dict[str, Any]:
    """Family name -> family; fails on a name seen twice (samples grouped by mirror, say)."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} appears twice"
        out[fam.name] = fam
    return out


def json_leaves(st: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What `stats --json` says, keyed the way the metrics name it (independently of
    mirrorfs.metrics: the field tables are the interface, the walk is the test's own)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    from mirrorfs.metrics import FIELDS  # here: the test fails, not its import, on old code

    def name(section: str, key: str) -> str:
        meta = FIELDS.get((section, key))
        n = f"mirrorfs_{section}_{key}" if section else f"mirrorfs_{key}"
        return n + "_" + meta.unit if meta is not None and meta.unit else n

    for k, v in st.items():
        if isinstance(v, bool | int | float) and v is not None:
            out[(name("", k), ())] = float(v)
    for section, label, table in (("mirror", "mirror", st["mirrors"]),
                                  ("pull", "mirror", st["pull"]),
                                  ("task", "task", st.get("tasks", {}))):
        for mirror, fields in table.items():
            for k, v in fields.items():
                if isinstance(v, bool | int | float) and v is not None:
                    out[(name(section, k), ((label, mirror),))] = float(v)
    return out


def check_exposition(text: str, st: dict[str, Any]) -> dict[str, Any]:
    fams = parse(text)
    mine = {n: f for n, f in fams.items() if n.startswith("mirrorfs_")}
    for n, f in fams.items():
        assert f.type in ("counter", "gauge"), (n, f.type)  # never "unknown"
        assert f.documentation, n  # every family has HELP
    got = {}
    for f in mine.values():
        for s in f.samples:
            if f.type == "counter":
                assert s.name == f.name + "_total", s.name  # counters end in _total
            got[(f.name, tuple(sorted(s.labels.items())))] = s.value
    want = json_leaves(st)
    assert set(got) == set(want), (set(got) ^ set(want))
    for key, v in want.items():
        if key[0].endswith("_age_seconds"):  # grows between the two reads
            assert abs(got[key] - v) < 60, key
        else:
            assert got[key] == v or (math.isnan(v) and math.isnan(got[key])), (key, got[key], v)
    return mine


def test_prometheus_output_and_endpoint_typed_and_equal_to_json(make_mount: Any, s3: Any,
                                                                tmp_path: Path) -> None:
    port = free_port()
    dm = tmp_path / "dm"
    dm.mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options()}, "dm": {"type": "dir", "path": str(dm)}},
                   upload_delay=3600, metrics_listen=f"127.0.0.1:{port}")
    (m.path / "a").write_bytes(os.urandom(MiB))
    (m.path / "b").write_bytes(b"b" * 1000)
    drain(m)
    assert not admin(m, "evict", str(m.path / "a"))["kept"]
    (m.path / "a").read_bytes()  # a miss and a download
    (m.path / "b").read_bytes()  # a hit
    (m.path / "pending").write_bytes(b"p")
    admin(m, "pause", "dm")
    st = admin(m, "stats")
    text = run("stats", "--prometheus", "-c", str(m.config)).stdout
    fams = check_exposition(text, st)
    # the figures an operator graphs, by name
    assert fams["mirrorfs_files"].type == "gauge"
    assert fams["mirrorfs_files"].samples[0].value == 3
    up = fams["mirrorfs_mirror_uploads"]
    assert up.type == "counter"
    assert {s.labels["mirror"]: s.value for s in up.samples} == {"s3": 2, "dm": 2}
    assert {s.labels["mirror"] for s in fams["mirrorfs_mirror_pending"].samples} == {"s3", "dm"}
    assert fams["mirrorfs_misses"].samples[0].value >= 1
    assert fams["mirrorfs_mirror_paused"].samples[0].labels and \
        {s.labels["mirror"]: s.value for s in fams["mirrorfs_mirror_paused"].samples} == \
        {"s3": 0, "dm": 1}
    # the scrape endpoint serves the same families from the daemon
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        scraped = r.read().decode()
    check_exposition(scraped, admin(m, "stats"))
    assert "process_resident_memory_bytes" in scraped
    # --textfile writes the same text atomically, also offline
    m.umount()
    prom = tmp_path / "mirrorfs.prom"
    r = run("stats", "--textfile", str(prom), "-c", str(m.config))
    assert r.returncode == 0, r.stderr
    check_exposition(prom.read_text(), admin(m, "stats"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("mirrorfs.prom.")]


def test_metrics_endpoint_is_off_by_default_and_on_loopback(make_mount: Any) -> None:
    m = make_mount()
    assert "serving Prometheus metrics" not in m.log_text()
    port = free_port()
    m2 = make_mount(name="m2", metrics_listen=str(port))  # a bare port: loopback only
    assert f"serving Prometheus metrics on http://127.0.0.1:{port}/metrics" in m2.log_text()
    conns = open("/proc/net/tcp").read().splitlines()[1:]
    listening = [c.split()[1] for c in conns if c.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening, listening
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert b"# TYPE mirrorfs_files gauge" in r.read()


def test_grafana_dashboard_uses_metrics_that_exist() -> None:
    """Every metric the dashboard names by name is one `stats --prometheus` writes."""
    import re

    from mirrorfs.metrics import FIELDS, family_name

    dash = json.loads((REPO / "tools" / "grafana" / "mirrorfs.json").read_text())
    known = set()
    for (section, key), meta in FIELDS.items():
        n = family_name(section, key)
        known.add(n + "_total" if meta.counter else n)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    named = {n for e in exprs for n in re.findall(r"\b(mirrorfs_[a-z_]+)\b", e)
             if not re.search(re.escape(n) + r"\.\*", e)}
    assert named and named <= known, named - known
    assert {"mirrorfs_mirror_pending", "mirrorfs_mirror_up", "mirrorfs_local_bytes",
            "mirrorfs_dirty_bytes", "mirrorfs_hits_total"} <= named


# ----------------------------------------------------------------------------- exit statuses


def test_exit_statuses_follow_the_table(make_mount: Any, s3: Any, tmp_path: Path) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    m.expect_log(r"verify: copy of|changed behind our back")
    (m.path / "f").write_bytes(b"good bytes")
    drain(m)
    c = s3.client()
    # verify that finds a bad object: 1 (it was 0)
    c.put_object(Bucket=s3.bucket, Key="f", Body=b"bad bytes!")
    r = run("verify", "--remote", "--deep", "-c", str(m.config))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "remote_bad" in r.stdout
    r = run("verify", "--remote", "--deep", "--repair", "-c", str(m.config))
    assert r.returncode == 1  # found (and repaired) a problem
    drain(m)
    r = run("verify", "--remote", "--deep", "-c", str(m.config))
    assert r.returncode == 0, r.stdout
    # bad usage: 2, one line
    for args in (["pause", "nosuch"], ["state", str(m.path / "nosuch")], ["url", str(m.path / "f")],
                 ["queue", "--mirror", "nosuch"], ["stats", "--bogus"]):
        r = run(*args, "-c", str(m.config))
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 or lines[-1].startswith("mirrorfs: error:"), r.stderr  # argparse
        assert "Traceback" not in r.stderr
    r = run("umount", str(tmp_path))
    assert r.returncode == 2 and "not a mirrorfs mount" in r.stderr
    # a mirror that refuses us: 2 for check-config as for mount
    bad = tmp_path / "bad.toml"
    bad.write_text(f'cache_dir = "{tmp_path}/c"\n[mirrors.s3]\ntype = "s3"\n'
                   + "".join(f'{k} = "{v}"\n' for k, v in
                             s3.options(bucket="no-such-bucket-here").items()
                             if k != "type"))
    r = run("check-config", str(bad))
    assert r.returncode == 2, r.stdout
    assert "mirror s3 (s3): ERROR" in r.stdout
    # busy: the daemon holds the cache directory but its socket is gone: 3
    (m.config.parent / "cache" / "control.sock").unlink()
    r = run("stats", "-c", str(m.config))
    assert r.returncode == 3, (r.returncode, r.stderr)
    # a command that needs a daemon, with none: 1
    m.umount()
    r = run("drain", "-c", str(m.config))
    assert r.returncode == 1 and "needs one" in r.stderr


def test_umount_of_a_busy_mount_is_3(make_mount: Any) -> None:
    m = make_mount()
    (m.path / "d").mkdir()
    p = subprocess.Popen(["sleep", "600"], cwd=m.path / "d")
    try:
        r = run("umount", str(m.path))
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert "busy" in r.stderr.lower()
    finally:
        p.kill()
        p.wait()


def test_output_into_a_closed_pipe_ends_quietly(make_mount: Any) -> None:
    m = make_mount()
    for i in range(3):
        (m.path / f"f{i}").write_text("x")
    for args in (["stats"], ["stats", "--json"], ["stats", "--prometheus"],
                 ["state", str(m.path / "f0"), str(m.path / "f1")]):
        rfd, wfd = os.pipe()
        os.close(rfd)  # the reader is gone before the first byte (`| head -0`)
        r = subprocess.run([*CLI, *args, "-c", str(m.config)], stdout=wfd,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60)
        os.close(wfd)
        assert r.stderr == "", (args, r.stderr)
        assert r.returncode == 0, args
    # and the ordinary pipeline
    r = subprocess.run(f"set -o pipefail; {' '.join(CLI)} stats -c {m.config} | head -1",
                       shell=True, executable="/bin/bash", capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("files"), r


def test_readme_tables_name_every_command() -> None:
    """The README's exit-status table and its command table cover every subcommand."""
    import re

    from mirrorfs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = set(sub.choices)  # type: ignore[arg-type]
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Exit status", 1)[1].split("\n## ", 1)[0]
    in_table = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            in_table |= set(re.findall(r"`([a-z-]+)", line.split("|")[1]))
    assert commands <= in_table, commands - in_table
    usage = readme.split("### Admin commands", 1)[1]
    for cmd in commands - {"mount", "umount", "check-config", "install", "install-helper"}:
        assert f"| `{cmd}" in usage or f", `{cmd}" in usage, cmd


# ----------------------------------------------------------------------------- mounting


def test_mount_refuses_a_non_empty_or_mounted_mount_point(make_mount: Any,
                                                          tmp_path: Path) -> None:
    m = make_mount(start=False)
    m.path.mkdir()
    (m.path / "hidden.txt").write_text("under the mount")
    for fg in (["--foreground"], []):
        r = run("mount", *fg, str(m.config), str(m.path))
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [
            f"mirrorfs: mount point {m.path} is not empty (1 entries would be hidden); "
            "give -o nonempty to mount anyway"]
        assert not is_mounted(m.path)
    m.options = ["nonempty"]
    m.start()
    assert os.listdir(m.path) == []
    (m.path / "mine").write_text("on the mount")
    m.umount()
    assert sorted(os.listdir(m.path)) == ["hidden.txt"]
    (m.path / "hidden.txt").unlink()
    # a mount point that is already a mount: another mirrorfs (own cache dir) stacked on it
    m.options = []
    m.start()
    (m.path / "lower.txt").write_text("lower")
    top = make_mount(name="top", start=False)
    r = run("mount", str(top.config), str(m.path))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"mirrorfs: {m.path} is already a mount point (fuse.mirrorfs from {m.config}); "
        "unmount it first, or give -o nonempty to mount on top of it"]
    r = run("mount", str(top.config), str(m.path), "-o", "nonempty",
            "--log-file", str(tmp_path / "top.log"))
    assert r.returncode == 0, r.stderr
    try:
        assert os.listdir(m.path) == []  # the top one
        (m.path / "upper.txt").write_text("upper")
        # umount acts on the top mount, with the top mount's config (not the lower one's
        # cache lock, which it used to wait 60 s for)
        top_pid = int((top.config.parent / "cache" / "lock").read_text())
        r = run("umount", str(m.path), timeout=50)
        assert r.returncode == 0, r.stderr
        assert wait_gone(top_pid)
        assert sorted(os.listdir(m.path)) == ["lower.txt", "mine"]
        assert m.proc is not None and m.proc.poll() is None
    finally:
        if sum(line.split()[1] == str(m.path) for line in open("/proc/self/mounts")) > 1:
            lazy_unmount(m.path)  # the top one (the fixture unmounts the lower one)


def test_unreachable_mirror_is_told_at_the_terminal_and_daemon_detaches(
        make_mount: Any, ftp: Any, tmp_path: Path) -> None:
    import socket

    m = make_mount({"ftp": {"type": "ftp", **ftp.options(timeout=2)}}, start=False)
    m.path.mkdir()
    ftp.stop()
    sock_path = str(tmp_path / "syslog.sock")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(sock_path)
    syslog.settimeout(30)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MIRRORFS_SYSLOG_SOCKET": sock_path}
    try:
        # captured stdout/stderr pipes: run() returns only when every writer closed them,
        # so a daemon still holding the caller's stderr would hang it
        r = run("mount", str(m.config), str(m.path), env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert is_mounted(m.path)
        lines = r.stderr.splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("mirrorfs: warning: mirror ftp is unreachable at start")
        assert r.stdout == ""
        pid = int((m.config.parent / "cache" / "lock").read_text())
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        got = b""
        while b"mirrorfs mounted" not in got:
            got += syslog.recv(65536) + b"\n"
        assert b"mirrorfs[%d]: WARNING" % pid in got and b"unreachable at start" in got
        assert run("umount", str(m.path)).returncode == 0
        assert wait_gone(pid)
        # no syslog socket: the cache directory's log file
        env["MIRRORFS_SYSLOG_SOCKET"] = str(tmp_path / "none")
        r = run("mount", str(m.config), str(m.path), env=env, timeout=60)
        assert r.returncode == 0 and "unreachable at start" in r.stderr
        pid = int((m.config.parent / "cache" / "lock").read_text())
        assert run("umount", str(m.path)).returncode == 0
        assert wait_gone(pid)
        text = (m.config.parent / "cache" / "mirrorfs.log").read_text()
        assert "mirrorfs mounted" in text and "mirrorfs stopped" in text
    finally:
        syslog.close()
        lazy_unmount(m.path)
    # in the foreground with --log-file, the warning reaches stderr too
    p = subprocess.Popen([*CLI, "mount", "--foreground", str(m.config), str(m.path),
                          "--log-file", str(tmp_path / "fg.log")], stderr=subprocess.PIPE,
                         text=True, cwd=REPO)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        assert line.startswith("mirrorfs: warning: mirror ftp is unreachable at start"), line
        Mount(m.config, m.path, m.log).wait_for(lambda: is_mounted(m.path))
        assert run("umount", str(m.path)).returncode == 0
        assert p.wait(60) == 0
        assert p.stderr.read() == ""
    finally:
        p.kill()
        lazy_unmount(m.path)


# ----------------------------------------------------------------------------- state


def test_pause_survives_a_remount_and_stats_says_since_when(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    t0 = time.time()
    admin(m, "pause", "s3")
    admin(m, "pause", "s3")  # a second pause keeps the first one's time
    st = admin(m, "stats")["mirrors"]["s3"]
    assert st["paused"] is True and st["paused_by"] == "root"
    assert t0 - 1 <= st["paused_since"] <= time.time()
    since = st["paused_since"]
    text = run("stats", "-c", str(m.config)).stdout
    assert "paused since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) \
        + " by root" in text
    (m.path / "f").write_text("waits")
    m.umount()
    off = admin(m, "stats")["mirrors"]["s3"]  # offline, from LMDB
    assert off["paused"] is True and off["paused_since"] == since
    m.start()
    st = admin(m, "stats")["mirrors"]["s3"]
    assert st["paused"] is True and st["paused_since"] == since  # the daemon's own state
    assert st["pending"] == 1 and s3_keys(s3) == []
    # resume offline, then mount: uploads go
    m.umount()
    assert admin(m, "resume")["resumed"] == ["s3"]
    m.start()
    assert admin(m, "stats")["mirrors"]["s3"]["paused"] is False
    m.wait_for(lambda: s3_keys(s3) == ["f"], timeout=60)
    # pause offline: the next mount starts paused
    m.umount()
    admin(m, "pause")
    m.start()
    st = admin(m, "stats")["mirrors"]["s3"]
    assert st["paused"] is True and st["paused_by"] == "root"


def s3_keys(s3: Any) -> list[str]:
    r = s3.client().list_objects_v2(Bucket=s3.bucket)
    return sorted(o["Key"] for o in r.get("Contents", []))


def test_state_shows_pinned_and_pin_of_a_remote_only_file(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    assert "startup check (new cache directory)" in m.log_text()
    assert "after a crash" not in m.log_text()
    data = os.urandom(200_000)
    (m.path / "f").write_bytes(data)
    drain(m)
    assert not admin(m, "evict", str(m.path / "f"))["kept"]
    r = run("pin", str(m.path / "f"), "-c", str(m.config))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "pinned 1 files",
        "1 of them are remote-only: each stays on local disk once it is read "
        "(pin --fetch downloads them now)"]
    r = run("state", str(m.path / "f"), "-c", str(m.config))
    assert r.stdout.split() == ["remote-only", "f", "s3=uploaded", "pinned"]
    r = admin(m, "pin", "--fetch", str(m.path / "f"))
    assert r["downloaded"] == 1 and r["remote_only"] == 0
    st = admin(m, "state", str(m.path / "f"))["f"]
    assert st["state"] == "uploaded" and st["pinned"] is True
    assert (m.path / "f").read_bytes() == data
    m.umount()
    m.start()
    assert "startup check (clean stop)" in m.log_text()


def test_import_makes_folder_markers_directories(make_mount: Any, s3: Any) -> None:
    c = s3.client()
    for key, body in {"folder/": b"", "folder/sub/": b"", "photos/a.jpg": b"jpeg",
                      "empty-dir/": b""}.items():
        c.put_object(Bucket=s3.bucket, Key=key, Body=body)
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    r = admin(m, "import", "s3")
    assert r["added"] == 1 and r["dirs"] == 3 and r["rejected"] == 0, r
    assert sorted(os.listdir(m.path)) == ["empty-dir", "folder", "photos"]
    assert os.listdir(m.path / "folder") == ["sub"]
    assert os.path.isdir(m.path / "folder" / "sub")
    assert (m.path / "photos" / "a.jpg").read_bytes() == b"jpeg"
    assert admin(m, "import", "s3")["dirs"] == 0  # a rerun adds nothing


def test_import_shows_names_the_kernel_had_cached_as_missing(make_mount: Any, s3: Any) -> None:
    """Entries are cached for attr_timeout (300 s by default), negative ones too: a name
    looked up before an import made it must show right after the import, and the
    directory's new attributes with it (the import invalidates the entries it adds)."""
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=3600)
    (m.path / "photos").mkdir()
    assert not (m.path / "photos" / "a.jpg").exists()  # a negative entry, now cached
    assert not (m.path / "new").exists()
    mtime = os.stat(m.path / "photos").st_mtime_ns
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="photos/a.jpg", Body=b"jpeg")
    c.put_object(Bucket=s3.bucket, Key="new/b.jpg", Body=b"b")
    r = admin(m, "import", "s3")
    assert r["added"] == 2, r
    assert (m.path / "photos" / "a.jpg").read_bytes() == b"jpeg"
    assert (m.path / "new" / "b.jpg").read_bytes() == b"b"
    assert os.stat(m.path / "photos").st_mtime_ns != mtime


def test_url_finds_the_mount_from_the_path(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options(url_base="https://cdn.example.com")}},
                   upload_delay=3600)
    make_mount(name="other")  # two mirrorfs mounts on the machine
    (m.path / "d").mkdir()
    (m.path / "d" / "pic.jpg").write_bytes(b"x")
    r = subprocess.run([*CLI, "url", str(m.path / "d" / "pic.jpg")], capture_output=True,
                       text=True, cwd="/", timeout=60, env={
                           **os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "https://cdn.example.com/d/pic.jpg"


# ----------------------------------------------------------------------------- installing


def test_install_into_a_root_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`mirrorfs install --root` puts the command, the helper and the units in place, and
    systemd-analyze verify accepts the units as installed (their commands exist)."""
    import shutil

    from mirrorfs.install import render

    if shutil.which("systemd-analyze") is None:  # Debian's systemd package ships it
        import pytest

        pytest.skip("no systemd-analyze on this machine")
    root = tmp_path / "root"
    r = run("install", "--root", str(root))
    assert r.returncode == 0, r.stderr
    cmd = root / "usr/local/bin/mirrorfs"
    helper = root / "sbin/mount.fuse.mirrorfs"
    service = root / "etc/systemd/system/mirrorfs@.service"
    mount_unit = root / "usr/share/doc/mirrorfs/examples/srv-media.mount"
    for f in (cmd, helper):
        assert os.access(f, os.X_OK), f
    assert f"ExecStart={cmd} mount --foreground" in service.read_text()
    assert f"exec {cmd} mount" in helper.read_text()
    # the installed command runs this mirrorfs
    r2 = subprocess.run([str(cmd), "install", "--help"], capture_output=True, text=True,
                        cwd="/", timeout=60, env={k: v for k, v in os.environ.items()
                                                  if k != "PYTHONPATH"})
    assert r2.returncode == 0 and "--root" in r2.stdout, r2.stderr
    for unit in (service, mount_unit):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, timeout=120)
        assert v.returncode == 0, v.stderr
        assert "mirrorfs" not in v.stderr, v.stderr
    # tools/systemd holds the same units as installed on /
    for rel, (text, _mode) in render("/").items():
        if rel.endswith((".service", ".mount")):
            assert (REPO / "tools" / "systemd" / os.path.basename(rel)).read_text() == text


def test_metrics_take_stats_fields_added_later() -> None:
    """Fields other work adds to `stats` (audit findings per mirror, task restarts) become
    typed families with no change to the metrics module."""
    from mirrorfs.metrics import exposition

    st = {"files": 1, "mirrors": {"s3": {"uploads": 3, "audit": {"missing": 2, "stray": 0},
                                         "last_error": "x"},
                                  "ftp": {"uploads": 1, "audit": {"missing": 0, "stray": 1}}},
          "task_restarts": {"uploader:s3": 2, "space-keeper": 0}, "quarantined": 4,
          "pull": {}}
    fams = parse(exposition(st).decode())
    assert {s.labels["mirror"]: s.value for s in fams["mirrorfs_mirror_audit_missing"].samples} \
        == {"s3": 2, "ftp": 0}
    assert fams["mirrorfs_mirror_audit_stray"].type == "gauge"
    assert fams["mirrorfs_task_restarts_uploader_s3"].type == "counter"
    assert fams["mirrorfs_task_restarts_uploader_s3"].samples[0].value == 2
    assert fams["mirrorfs_quarantined"].samples[0].value == 4
    assert all(f.documentation and f.type in ("gauge", "counter") for f in fams.values())


def test_mount_after_a_crash_clears_the_dead_mount(make_mount: Any) -> None:
    """A daemon killed outright leaves a dead mount (ENOTCONN) on its mount point; mounting
    the same config again (as systemd's Restart=on-failure does) detaches it and mounts."""
    import errno
    import signal

    m = make_mount()
    (m.path / "f").write_text("kept")
    assert m.proc is not None
    os.killpg(m.proc.pid, signal.SIGKILL)
    m.proc.wait()
    m.proc = None
    try:
        os.stat(m.path)
        raise AssertionError("the mount is not dead")
    except OSError as exc:
        assert exc.errno == errno.ENOTCONN
    m.expect_log(r"that died; detaching it")
    try:
        r = run("mount", str(m.config), str(m.path), "--log-file", str(m.log))
        assert r.returncode == 0, r.stderr
        assert "that died; detaching it" in r.stderr
        assert (m.path / "f").read_text() == "kept"
        pid = int((m.config.parent / "cache" / "lock").read_text())
        # a dead mount of another config is not touched: refused, one line
        other = make_mount(name="other", start=False)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        r = run("mount", str(other.config), str(m.path))
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "already a mount point" in r.stderr
    finally:
        lazy_unmount(m.path)
