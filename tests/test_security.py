"""Issue 6: security properties, through the real mount and a second, non-root user.

- the daemon never follows a symlink out of its cache directory: a content file replaced by
  a symlink to a file elsewhere is neither served to readers nor uploaded to the mirrors;
- symlinks made in the mount are just symlinks (resolved by the kernel as the caller, never
  opened by the daemon, never sent to a mirror), and a symlink planted in a directory mirror
  is not followed by uploads;
- the cache directory and its registry are private: the control socket is mode 0600 and
  another user can neither connect to it nor read the registry (file names, xattrs);
- secrets (``secret_access_key``, the FTP password) never reach the daemon log, at DEBUG
  too, nor the output of ``stats``/``queue``/``check-config``, nor an error message;
- the mount uses ``default_permissions``: with ``allow_other`` the kernel enforces modes for
  other users, and a refused open of a remote-only file downloads nothing.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mountutil import REPO, drop_page_cache
from tests.servers import PyFtpd
from tests.test_mirrors import admin, drain
from tests.test_posix import as_user, content_path, other_user

__all__ = ["other_user"]  # the fixture, re-exported for the tests below

MiB = 1 << 20


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are 0700, which would make
    every other-user check pass for the wrong reason)."""
    d = Path(tempfile.mkdtemp(prefix="rel-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


def files_below(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink() and not f.startswith(".mirrorfs-"):
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


# ---------------------------------------------------------------------- symlinks


def test_content_file_swapped_for_a_symlink_is_not_followed(make_mount: Any, s3: Any,
                                                           tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"TOP SECRET, outside the cache")
    (tmp_path / "dm").mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options()},
                    "dir": {"type": "dir", "path": str(tmp_path / "dm")}},
                   upload_delay=3600)
    for p in (r"victim", r"Too many levels of symbolic links", r"ELOOP",
              r"failed unexpectedly", r"^Traceback"):
        m.expect_log(p)
    (m.path / "victim.txt").write_bytes(b"mine")
    (m.path / "clean.txt").write_bytes(b"clean")
    ino = os.stat(m.path / "victim.txt").st_ino
    cpath = content_path(m, ino)
    assert cpath.read_bytes() == b"mine"
    cpath.unlink()
    cpath.symlink_to(secret)
    drop_page_cache(m.path / "clean.txt")
    # readers: an error, never the outside file
    for flags in (os.O_RDONLY, os.O_RDWR):
        try:
            fd = os.open(m.path / "victim.txt", flags)
        except OSError as exc:
            assert exc.errno in (errno.EIO, errno.ELOOP), exc
            continue
        try:
            data = os.pread(fd, 100, 0)
        finally:
            os.close(fd)
        assert b"SECRET" not in data
    # uploads: the pending upload of victim.txt must not send the outside file anywhere
    admin(m, "drain", "--timeout", "4", check=False)
    time.sleep(1)
    assert b"SECRET" not in b"".join(files_below(tmp_path / "dm").values())
    c = s3.client()
    for o in c.list_objects_v2(Bucket=s3.bucket).get("Contents", []):
        body = c.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
        assert b"SECRET" not in body, o["Key"]
    assert files_below(tmp_path / "dm").get("clean.txt") == b"clean"
    assert (m.path / "clean.txt").read_bytes() == b"clean"
    assert secret.read_bytes() == b"TOP SECRET, outside the cache"  # untouched
    assert cpath.is_symlink()  # and not written through either


def test_symlinks_in_the_mount_are_just_symlinks(make_mount: Any, tmp_path: Path,
                                                 other_user: pwd.struct_passwd,
                                                 open_dir: Path) -> None:
    dm = open_dir / "dm"
    outside = open_dir / "outside"
    dm.mkdir()
    outside.mkdir()
    (dm / "planted").symlink_to(outside)  # someone planted a symlink in the mirror
    m = make_mount({"dir": {"type": "dir", "path": str(dm)}}, upload_delay=0,
                   options=["allow_other"])
    m.expect_log(r"refusing to follow")
    os.chmod(m.path, 0o755)
    os.symlink("/etc/shadow", m.path / "shadow")
    os.symlink(str(outside), m.path / "out")
    assert os.readlink(m.path / "shadow") == "/etc/shadow"
    # the kernel resolves a symlink as the caller: the other user meets /etc/shadow's mode
    with pytest.raises(OSError) as info:
        as_user(other_user, m.path, lambda: open("shadow", "rb").read())
    assert info.value.errno == errno.EACCES
    # a file under the planted name: the upload must not write through the mirror's symlink
    (m.path / "planted").mkdir()
    (m.path / "planted" / "f.txt").write_bytes(b"stays inside")
    (m.path / "plain.txt").write_bytes(b"plain")
    r = admin(m, "drain", "--timeout", "30")
    assert r["drained"], r
    assert list(outside.iterdir()) == []
    assert files_below(dm) == {"plain.txt": b"plain"}
    assert [p.name for p in dm.iterdir() if p.is_symlink()] == ["planted"]  # ours: none
    failed = [q for q in admin(m, "queue") if q["state"] == "failed"]
    assert [q["path"] for q in failed] == ["planted/f.txt"], failed


# ---------------------------------------------------------------------- the cache directory


def test_control_socket_and_registry_are_private(make_mount: Any, open_dir: Path,
                                                 other_user: pwd.struct_passwd) -> None:
    cache = open_dir / "cache"
    m = make_mount(cache_dir=str(cache), xattrs=True, options=["allow_other"])
    os.chmod(m.path, 0o777)
    os.mkdir(m.path / "private", 0o700)
    (m.path / "private" / "salary-2026.xlsx").write_bytes(b"numbers")
    os.setxattr(m.path / "private" / "salary-2026.xlsx", "user.note", b"confidential")
    sock = cache / "control.sock"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0

    def connect() -> None:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(sock))
            s.sendall(b'{"cmd": "stats"}\n')
            s.recv(100)
        finally:
            s.close()

    with pytest.raises(OSError) as info:
        as_user(other_user, open_dir, connect)
    assert info.value.errno == errno.EACCES
    # the mount hides the private directory from the other user ...
    with pytest.raises(OSError) as info:
        as_user(other_user, m.path, os.listdir, "private")
    assert info.value.errno == errno.EACCES

    # ... and so must the cache directory: no reading the registry behind the mount's back
    def snoop() -> list[str]:
        found = []
        for dirpath, _dirs, files in os.walk("cache"):
            for f in files:
                try:
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        data = fh.read()
                except OSError:
                    continue
                if b"salary-2026" in data or b"confidential" in data:
                    found.append(os.path.join(dirpath, f))
        return found

    assert as_user(other_user, open_dir, snoop) == []
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((cache / "meta" / name).stat().st_mode) == 0o600, name


# ---------------------------------------------------------------------- secrets


def test_secrets_never_reach_logs_or_output(make_mount: Any, s3: Any,
                                            tmp_path: Path) -> None:
    s3_secret = "s3SECRET" + secrets.token_hex(12)
    ftp_password = "ftpPASS" + secrets.token_hex(12)
    with PyFtpd(tmp_path / "ftp-root", password=ftp_password) as ftp:
        mirrors = {"s3": {"type": "s3", **s3.options(secret_access_key=s3_secret)},
                   "ftp": {"type": "ftp", **ftp.options()}}
        m = make_mount(mirrors, upload_delay=0, log_level="DEBUG")
        m.expect_log(r"is unreachable|failed \(attempt|could not")
        for i in range(3):
            (m.path / f"f{i}.bin").write_bytes(os.urandom(200_000))
        drain(m)
        assert not admin(m, "evict", str(m.path / "f0.bin"))["kept"]
        drop_page_cache(m.path / "f0.bin")
        (m.path / "f0.bin").read_bytes()
        outputs = [json.dumps(admin(m, cmd)) for cmd in ("stats", "queue")]
        # make the FTP mirror fail once with its connections cut: errors are logged
        ftp.stop()
        (m.path / "late.bin").write_bytes(b"late")
        m.wait_for(lambda: admin(m, "stats")["mirrors"]["ftp"]["up"] is False, timeout=60)
        outputs.append(json.dumps(admin(m, "stats")))
        ftp.start()
        drain(m)
        r = subprocess.run([sys.executable, "-m", "mirrorfs.cli", "check-config",
                            str(m.config)], capture_output=True, text=True, cwd=REPO)
        outputs += [r.stdout, r.stderr]
        assert m.umount() == 0
        # a wrong password: the mount is refused with a message that does not echo it
        wrong = "wrongPASS" + secrets.token_hex(12)
        bad = make_mount({"ftp": {"type": "ftp", **ftp.options(password=wrong)}},
                         name="bad", start=False, log_level="DEBUG")
        bad.path.mkdir()
        r = subprocess.run([sys.executable, "-m", "mirrorfs.cli", "mount", "--foreground",
                            str(bad.config), str(bad.path)], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        assert r.returncode != 0
        outputs += [r.stdout, r.stderr]
    log = m.log_text()
    assert "DEBUG" in log and len(log) > 10_000  # DEBUG really was on
    for secret in (s3_secret, ftp_password, wrong):
        assert secret not in log, "a secret is in the daemon log"
        for out in outputs:
            assert secret not in out, f"a secret is in command output: {out[:200]}"
    assert ftp_password[:12] not in log and s3_secret[:12] not in log
    cfg_mode = stat.S_IMODE(os.stat(m.config).st_mode)
    assert cfg_mode == 0o600


# ---------------------------------------------------------------------- permissions


def test_kernel_enforces_modes_for_other_users(make_mount: Any, s3: Any,
                                               other_user: pwd.struct_passwd) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0,
                   options=["allow_other"])
    with open("/proc/self/mounts") as f:
        opts = next(line.split()[3] for line in f if line.split()[1] == str(m.path))
    assert "default_permissions" in opts.split(",") and "allow_other" in opts.split(",")
    os.chmod(m.path, 0o755)
    (m.path / "secret.bin").write_bytes(os.urandom(MiB))
    os.chmod(m.path / "secret.bin", 0o600)
    (m.path / "public.txt").write_bytes(b"public")
    os.chmod(m.path / "public.txt", 0o644)
    drain(m)
    assert not admin(m, "evict", str(m.path / "secret.bin"))["kept"]
    before = admin(m, "stats")

    def read(name: str) -> bytes:
        with open(name, "rb") as f:
            return f.read()

    def write(name: str) -> None:
        with open(name, "ab") as f:
            f.write(b"x")

    u = other_user
    for fn, args, err in ((read, ("secret.bin",), errno.EACCES),
                          (write, ("public.txt",), errno.EACCES),
                          (write, ("new.txt",), errno.EACCES),
                          (os.chmod, ("public.txt", 0o666), errno.EPERM),
                          (os.chown, ("public.txt", u.pw_uid, u.pw_gid), errno.EPERM),
                          (os.unlink, ("public.txt",), errno.EACCES),
                          (os.rename, ("public.txt", "mine.txt"), errno.EACCES),
                          (os.setxattr, ("public.txt", "user.x", b"1"), errno.EACCES)):
        with pytest.raises(OSError) as info:
            as_user(u, m.path, fn, *args)
        assert info.value.errno in (err, errno.EOPNOTSUPP), (fn.__name__, args,
                                                            info.value)
    assert as_user(u, m.path, read, "public.txt") == b"public"
    after = admin(m, "stats")  # misses are counted at open, before it returns
    assert after["misses"] == before["misses"], "a refused open started a download"
    assert (m.path / "public.txt").read_bytes() == b"public"


def test_without_allow_other_other_users_see_nothing(make_mount: Any,
                                                     other_user: pwd.struct_passwd) -> None:
    m = make_mount()
    os.chmod(m.path, 0o777)
    (m.path / "f.txt").write_bytes(b"x")
    os.chmod(m.path / "f.txt", 0o666)
    parent = m.path.parent
    os.chmod(parent, 0o755)
    with pytest.raises(OSError) as info:
        as_user(other_user, parent, os.stat, "mnt/f.txt")
    assert info.value.errno == errno.EACCES
