"""The ``mirrorfs`` command: config errors, exit codes, daemonizing, unmounting, signals."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirrorfs import cli as mirrorfs_cli
from mirrorfs.cache.db import U64, Database
from tests.conftest import MountFactory
from tests.mountutil import REPO, is_mounted, lazy_unmount
from tests.test_posix import as_user, other_user, write_file

__all__ = ["other_user"]  # the fixture, re-exported for the tests below

EXIT_USAGE, EXIT_BUSY = 2, 3


def cli(*args: str, timeout: float = 60.0,
        stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mirrorfs.cli", *args], env=env,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout,
                          check=False)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def daemon_pid(cache: Path) -> int:
    """The daemon writes its pid into the cache directory's lock file."""
    return int((cache / "lock").read_text().strip())


# ----------------------------------------------------------------------------- config errors


BAD_CONFIGS = {
    "unknown-key": ('cache_dir = "c"\ncache_sise = "1G"\n', "cache_sise", "unknown key"),
    "wrong-type": ('cache_dir = "c"\nxattrs = "yes"\n', "xattrs", "expected true or false"),
    "missing-cache-dir": ('log_level = "INFO"\n', "cache_dir", "missing (required)"),
    "bad-mirror-type": ('cache_dir = "c"\n[mirrors.a]\ntype = "nfs"\n', "mirrors.a.type",
                        "expected one of s3, ftp, dir, got 'nfs'"),
    "s3-without-bucket": ('cache_dir = "c"\n[mirrors.a]\ntype = "s3"\n', "mirrors.a.bucket",
                          "missing (required)"),
    "unknown-mirror-key": ('cache_dir = "c"\n[mirrors.a]\ntype = "dir"\npath = "/x"\n'
                           'pth = "/y"\n', "mirrors.a.pth", "unknown key"),
    "toml-syntax": ('cache_dir = "c"\nxattrs = = true\n', "(syntax)", "line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_invalid_config(tmp_path: Path, case: str) -> None:
    text, key, problem = BAD_CONFIGS[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    (tmp_path / "mnt").mkdir()
    r = cli("mount", "--foreground", str(cfg), str(tmp_path / "mnt"))
    assert r.returncode == EXIT_USAGE, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert str(cfg) in lines[0] and key in lines[0] and problem in lines[0], lines[0]
    assert r.stdout == ""
    assert not is_mounted(tmp_path / "mnt")
    assert not (tmp_path / "c").exists()  # nothing was created


def test_config_file_missing(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = cli("mount", str(tmp_path / "nope.toml"), str(tmp_path / "mnt"))
    assert r.returncode == EXIT_USAGE
    assert r.stderr.splitlines() == [
        f"mirrorfs: invalid config: {tmp_path / 'nope.toml'}: (file): does not exist"]


def test_config_file_unreadable(tmp_path: Path, other_user: pwd.struct_passwd) -> None:
    """Root reads every file, so the command runs as another user on a root-only file."""
    cfg = tmp_path / "secret.toml"
    cfg.write_text('cache_dir = "c"\n')
    os.chmod(cfg, 0o600)
    (tmp_path / "mnt").mkdir()
    mirrorfs_cli.build_parser()  # imports what main() imports late: the child cannot read /root

    def run() -> tuple[int, str]:
        r, w = os.pipe()
        err = sys.stderr
        sys.stderr = os.fdopen(w, "w")
        try:
            code = mirrorfs_cli.main(["mount", "secret.toml", "mnt"])
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            sys.stderr.close()
            sys.stderr = err
        with os.fdopen(r) as f:
            return code, f.read()

    code, err = as_user(other_user, tmp_path, run)
    assert code == EXIT_USAGE
    assert err.splitlines() == [
        "mirrorfs: invalid config: secret.toml: (file): cannot be read: permission denied"]


# ----------------------------------------------------------------------------- mounting


def test_second_mount_of_a_cache_dir_is_refused(make_mount: MountFactory) -> None:
    first = make_mount(name="first")
    write_file(first.path / "f", b"first")
    cache = first.config.parent / "cache"
    second = make_mount(name="second", cache_dir=str(cache), start=False)
    second.path.mkdir()
    r = cli("mount", "--foreground", str(second.config), str(second.path))
    assert r.returncode == EXIT_BUSY, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(cache) in lines[0] and "in use by another mirrorfs" in lines[0]
    assert f"pid {first.pid}" in lines[0]
    assert not is_mounted(second.path)
    # and in the background too: the parent reports the daemon's refusal
    r = cli("mount", str(second.config), str(second.path))
    assert r.returncode == EXIT_BUSY, r.stderr
    assert r.stderr.strip().splitlines() == lines
    assert not is_mounted(second.path)
    # the first mount is untouched and keeps working
    assert first.proc is not None and first.proc.poll() is None
    assert (first.path / "f").read_bytes() == b"first"
    write_file(first.path / "g", b"still works")
    assert sorted(os.listdir(first.path)) == ["f", "g"]
    assert first.umount() == 0
    first.start()
    assert (first.path / "g").read_bytes() == b"still works"


def test_daemon_mount_and_umount(make_mount: MountFactory, tmp_path: Path) -> None:
    m = make_mount(start=False)
    m.path.mkdir()
    log = tmp_path / "daemon.log"
    cache = m.config.parent / "cache"
    try:
        r = cli("mount", str(m.config), str(m.path), "--log-file", str(log))
        assert r.returncode == 0, r.stderr
        assert is_mounted(m.path)  # mounted by the time the command returns
        pid = daemon_pid(cache)
        assert pid_alive(pid)
        write_file(m.path / "f", b"daemonized")
        assert (m.path / "f").read_bytes() == b"daemonized"
        r = cli("umount", str(m.path))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.path)
        assert wait_gone(pid), "the daemon did not exit after umount"
        assert (cache / "clean-shutdown").exists()
        text = log.read_text()
        assert "mirrorfs mounted" in text and "mirrorfs stopped" in text
        assert " ERROR " not in text and " WARNING " not in text and "Traceback" not in text
        # a second umount: not mounted any more
        r = cli("umount", str(m.path))
        assert r.returncode == EXIT_USAGE and "not a mirrorfs mount" in r.stderr
    finally:
        lazy_unmount(m.path)
    # the data is there for the next mount
    m.start()
    assert (m.path / "f").read_bytes() == b"daemonized"


def mounted_at(path: Path) -> bool:
    """Like mountutil.is_mounted, but decoding the octal escapes /proc/mounts uses."""
    want = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1]
            decoded = re.sub(r"\\([0-7]{3})", lambda mo: chr(int(mo.group(1), 8)), point)
            if decoded == want:
                return True
    return False


def test_umount_by_symlink_and_odd_path(make_mount: MountFactory, tmp_path: Path) -> None:
    """The mount point may contain a space and may be named through a symlink."""
    m = make_mount(start=False)
    point = tmp_path / "mount point\twith tab"
    point.mkdir()
    link = tmp_path / "link"
    link.symlink_to(point)
    log = tmp_path / "daemon.log"
    try:
        r = cli("mount", str(m.config), str(link), "--log-file", str(log))
        assert r.returncode == 0, r.stderr
        assert mounted_at(point)
        write_file(link / "f", b"x")
        pid = daemon_pid(m.config.parent / "cache")
        r = cli("umount", str(link))
        assert r.returncode == 0, r.stderr
        assert not mounted_at(point)
        assert wait_gone(pid)
        r = cli("mount", str(m.config), str(point), "--log-file", str(log))
        assert r.returncode == 0, r.stderr
        pid = daemon_pid(m.config.parent / "cache")
        assert (point / "f").read_bytes() == b"x"
        r = cli("umount", str(point) + "/")
        assert r.returncode == 0, r.stderr
        assert not mounted_at(point)
        assert wait_gone(pid)
    finally:
        lazy_unmount(point)


def test_daemon_detaches_from_the_callers_stderr(make_mount: MountFactory,
                                                tmp_path: Path) -> None:
    """Without --log-file a daemonized mount logs to syslog, or (no syslog socket, as here)
    to the cache directory; nothing more goes to the stderr it was started with (systemd
    runs it with --foreground, which keeps stderr)."""
    m = make_mount(start=False)
    m.path.mkdir()
    errlog = tmp_path / "stderr.txt"
    os.environ["MIRRORFS_SYSLOG_SOCKET"] = str(tmp_path / "no-syslog")
    try:
        with open(errlog, "w") as err:
            r = cli("mount", str(m.config), str(m.path), stderr=err.fileno())
    finally:
        del os.environ["MIRRORFS_SYSLOG_SOCKET"]
    try:
        assert r.returncode == 0
        assert is_mounted(m.path)
        pid = daemon_pid(m.config.parent / "cache")
        assert cli("umount", str(m.path)).returncode == 0
        assert wait_gone(pid)
    finally:
        lazy_unmount(m.path)
    assert errlog.read_text() == ""
    assert "mirrorfs mounted" in (m.config.parent / "cache" / "mirrorfs.log").read_text()


def test_daemon_start_failure_is_reported(make_mount: MountFactory, tmp_path: Path) -> None:
    """An unexpected start-up error in the background daemon reaches the caller and the log."""
    m = make_mount(start=False)
    m.path.mkdir()
    db = Database(str(m.config.parent / "cache" / "meta"))
    with db.begin(write=True) as txn:
        txn.put(b"schema", U64.pack(99), db=db.db["meta"])
    db.close()
    log = tmp_path / "daemon.log"
    r = cli("mount", str(m.config), str(m.path), "--log-file", str(log))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "mirrorfs: registry schema 99 is not supported (this mirrorfs knows 1)"]
    assert "ERROR" in log.read_text() and "Traceback" in log.read_text()
    assert not is_mounted(m.path)


def test_mount_point_missing(make_mount: MountFactory) -> None:
    m = make_mount(start=False)
    r = cli("mount", str(m.config), str(m.path))  # m.path was never created
    assert r.returncode == EXIT_USAGE
    assert r.stderr.strip() == f"mirrorfs: mount point {m.path} is not a directory"


def test_sigterm_unmounts_cleanly(make_mount: MountFactory) -> None:
    m = make_mount()
    write_file(m.path / "f", b"before SIGTERM")
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    rc = m.proc.wait(30)
    m.proc = None
    assert rc == 0
    assert not is_mounted(m.path)  # the daemon unmounted itself
    assert (m.config.parent / "cache" / "clean-shutdown").exists()
    assert "received SIGTERM: unmounting" in m.log_text()
    m.start()
    assert (m.path / "f").read_bytes() == b"before SIGTERM"
    assert "startup check (clean stop)" in m.log_text()
