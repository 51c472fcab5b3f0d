"""The core POSIX surface, through a real kernel mount.

Every test uses ordinary file calls from this process (or a forked child running as another
user) on the mount path; the daemon serving the mount runs in a subprocess (see mountutil).
Documented choices shown here: hard links of directories are refused with EPERM,
RENAME_EXCHANGE is refused with EINVAL, and extended attributes are off unless ``xattrs = true``
(the kernel then answers ENOTSUP for the whole mount).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import multiprocessing
import os
import pickle
import platform
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MountFactory
from tests.mountutil import Mount, Syscall, is_mounted, read_trace, strace_command

TEST_USER = "mirrorfs-test"
GiB = 1 << 30

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# ----------------------------------------------------------------------------- helpers


def renameat2(old: Path, new: Path, flags: int) -> None:
    """rename(2) with flags, through libc's renameat2 (or the raw syscall on old glibc)."""
    at_fdcwd = -100
    args = (at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        rc = fn(*args)
    else:
        assert platform.machine() == "x86_64", "renameat2 syscall number is for x86_64"
        rc = _libc.syscall(316, *args)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def sync_file_range_wait(fd: int) -> None:
    """Write the dirty pages of ``fd`` to the daemon and wait, without fsync (no commit)."""
    fn = _libc.sync_file_range
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    # SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    if fn(fd, 0, 0, 7) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def cache_dir(m: Mount) -> Path:
    return m.config.parent / "cache"


def content_path(m: Mount, ino: int) -> Path:
    """Where the store keeps the content of inode ``ino`` (see mirrorfs/cache/store.py)."""
    return cache_dir(m) / "data" / ("%02x" % (ino & 0xFF)) / ("%x" % ino)


def expect_errno(err: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    got = info.value.errno
    assert got == err, (f"{fn.__name__}{args}: expected {errno.errorcode[err]}, "
                        f"got {errno.errorcode.get(got or 0, got)}")


def remount(m: Mount) -> None:
    assert m.umount() == 0
    m.start()


@pytest.fixture(scope="session")
def other_user() -> pwd.struct_passwd:
    """A non-root user for permission tests: a uid and gid no account or group uses, so
    nothing is added to the host (the kernel checks numbers, not names; ``as_user`` forks
    and setuid()s, it needs no login). It used to be a system user left behind."""
    import grp

    for uid in range(64_000, 60_000, -1):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return pwd.struct_passwd((TEST_USER, "x", uid, uid, "mirrorfs tests",
                                      "/nonexistent", "/usr/sbin/nologin"))
    pytest.fail("no free uid between 60000 and 64000 for the permission tests")


def as_user(user: pwd.struct_passwd, cwd: Path, fn: Callable[..., Any], *args: Any,
            umask: int | None = None) -> Any:
    """Run ``fn(*args)`` in a forked child with the user's uid/gid (no supplementary groups)
    and working directory ``cwd``; return its result or re-raise its OSError here.

    A fork, not an exec: the interpreter lives under /root (mode 0700), which another user
    cannot execute. The child enters ``cwd`` as root, so ``fn`` uses relative paths and the
    0700 pytest temp directories above the mount do not get in the way.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            if umask is not None:
                os.umask(umask)
            try:
                out: tuple[str, Any] = ("ok", fn(*args))
            except OSError as exc:
                out = ("oserror", (exc.errno, str(exc)))
            except BaseException as exc:
                out = ("exception", repr(exc))
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value[0], value[1])
    if kind == "exception":
        raise AssertionError(f"child raised {value}")
    return value


def write_file(path: str | bytes | Path, data: bytes, mode: int = 0o666) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- files


def test_create_open_read_write(mnt: Mount) -> None:
    p = mnt.path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"hello world") == 11
        assert os.pread(fd, 5, 0) == b"hello"
        assert os.pwrite(fd, b"WORLD", 6) == 5
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100) == b"hello WORLD"
        assert os.fstat(fd).st_size == 11
    finally:
        os.close(fd)
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_size == 11 and st.st_nlink == 1
    assert p.read_bytes() == b"hello WORLD"
    # a bigger file, written in pieces larger and smaller than the kernel's write size
    blob = os.urandom(3 * 1024 * 1024 + 17)
    with open(mnt.path / "big", "wb") as f:
        for i in range(0, len(blob), 300_001):
            f.write(blob[i:i + 300_001])
    assert (mnt.path / "big").read_bytes() == blob
    remount(mnt)
    assert (mnt.path / "big").read_bytes() == blob
    assert p.read_bytes() == b"hello WORLD"


def test_o_append(mnt: Mount) -> None:
    p = mnt.path / "log"
    write_file(p, b"abc")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"def")
        os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the offset
        os.write(fd, b"ghi")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"abcdefghi"
    # two appenders interleave without overwriting each other
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"1")
        os.write(b, b"2")
        os.write(a, b"3")
    finally:
        os.close(a)
        os.close(b)
    assert p.read_bytes() == b"abcdefghi123"


def test_o_trunc(mnt: Mount) -> None:
    p = mnt.path / "t"
    write_file(p, b"hello world")
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"x"
    # Linux truncates on O_TRUNC even when the file is opened read-only
    write_file(mnt.path / "r", b"some bytes")
    os.close(os.open(mnt.path / "r", os.O_RDONLY | os.O_TRUNC))
    assert os.stat(mnt.path / "r").st_size == 0
    remount(mnt)
    assert p.read_bytes() == b"x"
    assert (mnt.path / "r").read_bytes() == b""


def test_o_trunc_after_uncommitted_writeback(mnt: Mount) -> None:
    """O_TRUNC must empty the content file even if the daemon already holds written data
    that was not yet committed (written back by the kernel, no close or fsync yet)."""
    p = mnt.path / "t"
    fd1 = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd1, b"x" * 10000)
        sync_file_range_wait(fd1)  # the bytes reach the daemon; nothing is committed
        fd2 = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.close(fd2)
        assert os.fstat(fd1).st_size == 0
    finally:
        os.close(fd1)
    assert os.stat(p).st_size == 0
    remount(mnt)
    assert os.stat(p).st_size == 0
    assert p.read_bytes() == b""


def test_o_excl(mnt: Mount) -> None:
    p = mnt.path / "x"
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    expect_errno(errno.EEXIST, os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.mkdir(mnt.path / "d")
    expect_errno(errno.EEXIST, os.open, mnt.path / "d", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    # without O_EXCL an existing file is simply opened
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT))


def test_truncate_grow_sparse_and_shrink(mnt: Mount) -> None:
    p = mnt.path / "s"
    write_file(p, b"0123456789")
    os.truncate(p, 1 << 20)  # by path
    assert os.stat(p).st_size == 1 << 20
    data = p.read_bytes()
    assert data[:10] == b"0123456789" and data[10:] == bytes((1 << 20) - 10)
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 3)  # by descriptor
        assert os.fstat(fd).st_size == 3
        assert os.pread(fd, 100, 0) == b"012"
        os.ftruncate(fd, 8)  # grow again: the cut bytes must not come back
        assert os.pread(fd, 100, 0) == b"012" + bytes(5)
        os.pwrite(fd, b"Z", 100)  # a write past EOF leaves a hole
        assert os.pread(fd, 200, 0) == b"012" + bytes(97) + b"Z"
    finally:
        os.close(fd)
    remount(mnt)
    assert p.read_bytes() == b"012" + bytes(97) + b"Z"
    assert os.path.getsize(content_path(mnt, os.stat(p).st_ino)) == 101


def test_mkdir_rmdir(mnt: Mount) -> None:
    d = mnt.path / "d"
    root_links = os.stat(mnt.path).st_nlink
    os.mkdir(d, 0o755)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2
    assert os.stat(mnt.path).st_nlink == root_links + 1
    os.mkdir(d / "sub")
    assert os.stat(d).st_nlink == 3
    write_file(d / "f", b"x")
    assert sorted(os.listdir(d)) == ["f", "sub"]
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, d / "f")
    expect_errno(errno.EEXIST, os.mkdir, d)
    os.rmdir(d / "sub")
    os.unlink(d / "f")
    os.rmdir(d)
    assert not d.exists()
    assert os.stat(mnt.path).st_nlink == root_links
    expect_errno(errno.ENOENT, os.rmdir, d)


class _Dirent(ctypes.Structure):
    # glibc's struct dirent on Linux with 64-bit ino_t/off_t
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def raw_readdir(path: Path) -> list[tuple[bytes, int]]:
    """(name, d_ino) of every entry readdir(3) returns, "." and ".." included (os.listdir
    and os.scandir drop those)."""
    _libc.opendir.restype = ctypes.c_void_p
    _libc.opendir.argtypes = [ctypes.c_char_p]
    _libc.readdir.restype = ctypes.POINTER(_Dirent)
    _libc.readdir.argtypes = [ctypes.c_void_p]
    _libc.closedir.argtypes = [ctypes.c_void_p]
    d = _libc.opendir(os.fsencode(path))
    if not d:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    out = []
    try:
        while True:
            ent = _libc.readdir(d)
            if not ent:
                break
            out.append((ent.contents.d_name, ent.contents.d_ino))
    finally:
        _libc.closedir(d)
    return out


def test_readdir_dot_and_dotdot(mnt: Mount) -> None:
    """readdir returns "." and ".." first, with the directory's and its parent's inode
    numbers; the root's ".." is the root itself."""
    m = mnt.path
    os.makedirs(m / "a" / "b")
    write_file(m / "a" / "f", b"x")
    root, a, b = (os.stat(p).st_ino for p in (m, m / "a", m / "a" / "b"))
    got = raw_readdir(m / "a")
    assert got[:2] == [(b".", a), (b"..", root)]
    assert sorted(got[2:]) == sorted([(b"b", b), (b"f", os.stat(m / "a" / "f").st_ino)])
    assert raw_readdir(m / "a" / "b") == [(b".", b), (b"..", a)]
    assert raw_readdir(m)[:2] == [(b".", root), (b"..", root)]
    assert root == 1
    # still right after the directory moved to another parent
    os.rename(m / "a" / "b", m / "b2")
    assert raw_readdir(m / "b2") == [(b".", b), (b"..", root)]


def test_readdir_large_and_changing(mnt: Mount) -> None:
    """Every entry is listed exactly once, also while entries are removed during the listing
    (shutil.rmtree unlinks as it reads, as rm -r does on big directories)."""
    d = mnt.path / "many"
    os.mkdir(d)
    names = {f"file-{i:05d}-{'x' * (i % 50)}" for i in range(2000)}
    for n in names:
        os.close(os.open(d / n, os.O_WRONLY | os.O_CREAT, 0o644))
    listed = os.listdir(d)
    assert len(listed) == len(names) and set(listed) == names
    seen = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 2 == 0:
                # remove what was read, and one not yet read (which may or may not be listed)
                j = (i + 1000) % 2000
                for victim in (entry.path, d / f"file-{j:05d}-{'x' * (j % 50)}"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(victim)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    survivors = set(os.listdir(d))
    assert survivors <= set(seen), "an entry present throughout was not listed"
    shutil.rmtree(d)
    assert not d.exists()


def test_unlink(mnt: Mount) -> None:
    p = mnt.path / "f"
    write_file(p, b"data")
    ino = os.stat(p).st_ino
    assert content_path(mnt, ino).exists()
    os.unlink(p)
    assert not p.exists()
    assert "f" not in os.listdir(mnt.path)
    mnt.wait_for(lambda: not content_path(mnt, ino).exists(), timeout=5)
    expect_errno(errno.ENOENT, os.unlink, p)
    # the name can be reused at once for a new file
    write_file(p, b"new")
    assert p.read_bytes() == b"new"


def test_unlinked_open_file_lives_until_last_close(mnt: Mount) -> None:
    p = mnt.path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    fd2 = os.open(p, os.O_RDONLY)
    try:
        os.write(fd, b"before")
        os.fsync(fd)
        ino = os.fstat(fd).st_ino
        data_file = content_path(mnt, ino)
        assert data_file.exists()
        os.unlink(p)
        assert not p.exists()
        os.pwrite(fd, b" after", 6)
        assert os.pread(fd, 100, 0) == b"before after"
        assert os.pread(fd2, 100, 0) == b"before after"
        os.fsync(fd)
        assert os.fstat(fd).st_size == 12
        assert os.fstat(fd).st_nlink == 0
        os.close(fd)
        fd = -1
        assert os.pread(fd2, 100, 0) == b"before after"
        assert data_file.exists()  # one handle still open
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(fd2)
    mnt.wait_for(lambda: not data_file.exists(), timeout=5)
    remount(mnt)
    assert os.listdir(mnt.path) == []
    assert not data_file.exists()


# ----------------------------------------------------------------------------- rename


def test_rename_files_and_dirs(mnt: Mount) -> None:
    m = mnt.path
    write_file(m / "a", b"A")
    os.rename(m / "a", m / "b")
    assert not (m / "a").exists() and (m / "b").read_bytes() == b"A"
    # a non-empty directory tree moves with its contents
    os.makedirs(m / "d1" / "deep")
    write_file(m / "d1" / "deep" / "f", b"deep")
    write_file(m / "d1" / "g", b"g")
    os.mkdir(m / "other")
    os.rename(m / "d1", m / "other" / "d2")
    assert not (m / "d1").exists()
    assert (m / "other" / "d2" / "deep" / "f").read_bytes() == b"deep"
    assert (m / "other" / "d2" / "g").read_bytes() == b"g"
    assert os.stat(m / "other").st_nlink == 3
    # a file moves between directories
    os.rename(m / "b", m / "other" / "d2" / "b")
    assert (m / "other" / "d2" / "b").read_bytes() == b"A"
    remount(mnt)
    assert sorted(os.listdir(m / "other" / "d2")) == ["b", "deep", "g"]
    assert (m / "other" / "d2" / "deep" / "f").read_bytes() == b"deep"
    assert os.stat(m / "other" / "d2" / "deep").st_nlink == 2
    # ".." of the moved directory is its new parent
    assert os.stat(m / "other" / "d2" / "deep" / "..").st_ino == os.stat(
        m / "other" / "d2").st_ino


def test_rename_replaces(mnt: Mount) -> None:
    m = mnt.path
    write_file(m / "src", b"new content")
    write_file(m / "dst", b"old content")
    old_ino = os.stat(m / "dst").st_ino
    os.rename(m / "src", m / "dst")
    assert (m / "dst").read_bytes() == b"new content"
    assert os.listdir(m) == ["dst"]
    mnt.wait_for(lambda: not content_path(mnt, old_ino).exists(), timeout=5)
    # a replaced file that is still open stays readable through its handle until closed
    write_file(m / "src", b"newer")
    fd = os.open(m / "dst", os.O_RDONLY)
    try:
        os.rename(m / "src", m / "dst")
        assert os.pread(fd, 100, 0) == b"new content"
        replaced = content_path(mnt, os.fstat(fd).st_ino)
        assert replaced.exists()
    finally:
        os.close(fd)
    mnt.wait_for(lambda: not replaced.exists(), timeout=5)
    assert (m / "dst").read_bytes() == b"newer"
    # a directory replaces an empty directory
    os.makedirs(m / "full" / "x")
    os.mkdir(m / "empty")
    os.rename(m / "full", m / "empty")
    assert os.listdir(m / "empty") == ["x"]
    assert not (m / "full").exists()
    assert os.stat(m).st_nlink == 3


def test_rename_errors(mnt: Mount) -> None:
    m = mnt.path
    write_file(m / "f", b"f")
    os.makedirs(m / "d" / "sub")
    os.mkdir(m / "empty")
    write_file(m / "d" / "sub" / "x", b"x")
    expect_errno(errno.EISDIR, os.rename, m / "f", m / "empty")
    expect_errno(errno.ENOTDIR, os.rename, m / "empty", m / "f")
    expect_errno(errno.ENOTEMPTY, os.rename, m / "empty", m / "d")
    expect_errno(errno.EINVAL, os.rename, m / "d", m / "d" / "sub" / "inside")
    expect_errno(errno.EINVAL, os.rename, m / "d", m / "d" / "sub")
    expect_errno(errno.ENOTEMPTY, os.rename, m / "d" / "sub", m / "d")
    expect_errno(errno.ENOENT, os.rename, m / "missing", m / "g")
    expect_errno(errno.ENOENT, os.rename, m / "f", m / "nodir" / "g")
    expect_errno(errno.ENOTDIR, os.rename, m / "f", m / "f" / "g")
    # nothing moved
    assert sorted(os.listdir(m)) == ["d", "empty", "f"]
    assert (m / "d" / "sub" / "x").read_bytes() == b"x"
    # renaming onto itself is a no-op
    os.rename(m / "f", m / "f")
    assert (m / "f").read_bytes() == b"f"


def test_renameat2_flags(mnt: Mount) -> None:
    m = mnt.path
    write_file(m / "a", b"A")
    write_file(m / "b", b"B")
    expect_errno(errno.EEXIST, renameat2, m / "a", m / "b", RENAME_NOREPLACE)
    renameat2(m / "a", m / "c", RENAME_NOREPLACE)
    assert (m / "c").read_bytes() == b"A" and not (m / "a").exists()
    # RENAME_EXCHANGE is not supported (documented): EINVAL, and nothing changes
    expect_errno(errno.EINVAL, renameat2, m / "b", m / "c", RENAME_EXCHANGE)
    assert (m / "b").read_bytes() == b"B" and (m / "c").read_bytes() == b"A"


# ----------------------------------------------------------------------------- links


def test_symlink_readlink(mnt: Mount) -> None:
    m = mnt.path
    write_file(m / "target", b"through the link")
    os.symlink("target", m / "ln")
    os.symlink("/nowhere/at/all", m / "dangling")
    assert os.readlink(m / "ln") == "target"
    assert os.readlink(m / "dangling") == "/nowhere/at/all"
    st = os.lstat(m / "ln")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target")
    assert (m / "ln").read_bytes() == b"through the link"
    assert not (m / "dangling").exists()
    expect_errno(errno.EINVAL, os.readlink, m / "target")
    expect_errno(errno.EEXIST, os.symlink, "x", m / "ln")
    os.rename(m / "ln", m / "ln2")
    remount(mnt)
    assert os.readlink(m / "ln2") == "target"
    os.unlink(m / "ln2")
    assert sorted(os.listdir(m)) == ["dangling", "target"]


def test_hard_links(mnt: Mount) -> None:
    """One inode, several names: st_nlink counts them, a write through one shows through
    all, unlinking or renaming one name leaves the others, across a remount too."""
    m = mnt.path
    os.mkdir(m / "d")
    write_file(m / "f", b"shared")
    os.link(m / "f", m / "g")
    os.link(m / "g", m / "d" / "h")  # into another directory, from a link
    st = os.stat(m / "f")
    assert st.st_nlink == 3
    assert {os.stat(p).st_ino for p in (m / "f", m / "g", m / "d" / "h")} == {st.st_ino}
    assert os.stat(m / "d" / "h").st_nlink == 3
    with open(m / "g", "r+b") as f:
        f.write(b"SH")
    assert (m / "f").read_bytes() == (m / "d" / "h").read_bytes() == b"SHared"
    os.chmod(m / "d" / "h", 0o600)
    assert stat.S_IMODE(os.stat(m / "f").st_mode) == 0o600
    # errors: an existing name, a directory, a missing source
    expect_errno(errno.EEXIST, os.link, m / "f", m / "g")
    expect_errno(errno.EPERM, os.link, m / "d", m / "d2")
    expect_errno(errno.ENOENT, os.link, m / "missing", m / "x")
    # unlink of one name keeps the others
    os.unlink(m / "f")
    assert not (m / "f").exists()
    assert os.stat(m / "g").st_nlink == 2
    assert (m / "g").read_bytes() == b"SHared"
    # rename of a name onto another name of the same inode does nothing (POSIX)
    os.rename(m / "g", m / "d" / "h")
    assert (m / "g").exists() and os.stat(m / "g").st_nlink == 2
    # rename of a link to a new name moves that name only
    os.rename(m / "d" / "h", m / "h2")
    assert sorted(os.listdir(m / "d")) == []
    assert os.stat(m / "h2").st_ino == st.st_ino and os.stat(m / "g").st_nlink == 2
    # another file renamed over a link: the inode loses that name, keeps the other
    write_file(m / "other", b"other")
    os.rename(m / "other", m / "g")
    assert (m / "g").read_bytes() == b"other" and os.stat(m / "g").st_nlink == 1
    assert os.stat(m / "h2").st_nlink == 1 and (m / "h2").read_bytes() == b"SHared"
    # link again, then everything survives a remount
    os.link(m / "h2", m / "d" / "again")
    remount(mnt)
    assert os.stat(m / "h2").st_nlink == 2
    assert os.stat(m / "d" / "again").st_ino == os.stat(m / "h2").st_ino
    assert (m / "d" / "again").read_bytes() == b"SHared"
    os.unlink(m / "h2")
    os.unlink(m / "d" / "again")
    assert sorted(os.listdir(m)) == ["d", "g"]
    ino = st.st_ino
    mnt.wait_for(lambda: not content_path(mnt, ino).exists(), timeout=5)


def test_hard_link_of_an_open_file(mnt: Mount) -> None:
    """A file open for writing (not yet closed) gets a second name; what is written after
    the link is there under both names; unlinking both leaves the open handle reading."""
    m = mnt.path
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before ")
        os.link(m / "f", m / "g")
        os.write(fd, b"after")
        assert os.fstat(fd).st_nlink == 2
    finally:
        os.close(fd)
    assert (m / "g").read_bytes() == b"before after"
    fd = os.open(m / "g", os.O_RDONLY)
    try:
        os.unlink(m / "f")
        os.unlink(m / "g")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 6, 0) == b"before"
    finally:
        os.close(fd)


def test_cp_a_keeps_hard_links(mnt: Mount, tmp_path: Path) -> None:
    """cp -a of a tree with hard links (it exited 1 when link() was refused), both into the
    mount and from it: the copies are linked the same way."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"a" * 1000)
    os.link(src / "a", src / "sub" / "a-link")
    os.link(src / "a", src / "b")
    (src / "single").write_bytes(b"single")
    subprocess.run(["cp", "-a", str(src), str(mnt.path / "copy")], check=True)
    c = mnt.path / "copy"
    assert os.stat(c / "a").st_nlink == 3 and os.stat(c / "single").st_nlink == 1
    assert os.stat(c / "a").st_ino == os.stat(c / "b").st_ino == \
        os.stat(c / "sub" / "a-link").st_ino
    assert (c / "sub" / "a-link").read_bytes() == b"a" * 1000
    back = tmp_path / "back"
    subprocess.run(["cp", "-a", str(c), str(back)], check=True)
    assert os.stat(back / "b").st_ino == os.stat(back / "sub" / "a-link").st_ino
    assert os.stat(back / "a").st_nlink == 3


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20


def falloc(fd: int, mode: int, off: int, length: int) -> None:
    fn = _libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fn(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_fallocate_modes(make_mount: MountFactory, tmp_path: Path) -> None:
    """fallocate(2) through the kernel (pyfuse3 patched with the handler, tools/patches):
    mode 0 grows the file with zeros, KEEP_SIZE reserves blocks in the cache file without
    growing it, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE zero a range (the cache is on ext4,
    which has them all); other modes are EOPNOTSUPP. The changed file is uploaded."""
    from tests.test_mirrors import drain, tree

    (tmp_path / "dm").mkdir()
    m = make_mount({"dir": {"type": "dir", "path": str(tmp_path / "dm")}}, upload_delay=0)
    p = m.path / "f"
    data = bytearray(os.urandom(256 * 1024))
    write_file(p, bytes(data))
    ino = os.stat(p).st_ino
    fd = os.open(p, os.O_RDWR)
    try:
        falloc(fd, 0, len(data), 64 * 1024)  # past the end: grows, zeros
        data += bytes(64 * 1024)
        assert os.fstat(fd).st_size == len(data)
        falloc(fd, FALLOC_FL_KEEP_SIZE, 0, 4 << 20)  # reserve 4 MiB, size unchanged
        st = os.fstat(fd)
        assert st.st_size == len(data)
        assert st.st_blocks * 512 >= 4 << 20, st.st_blocks
        assert content_path(m, ino).stat().st_blocks * 512 >= 4 << 20
        falloc(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 16384)
        data[8192:8192 + 16384] = bytes(16384)
        falloc(fd, FALLOC_FL_ZERO_RANGE, 100_000, 5000)
        data[100_000:105_000] = bytes(5000)
        for mode in (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE):
            expect_errno(errno.EOPNOTSUPP, falloc, fd, mode, 0, 4096)
        assert os.pread(fd, len(data) + 10, 0) == bytes(data)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == len(data)
    assert p.read_bytes() == bytes(data)
    drain(m)
    assert tree(tmp_path / "dm") == {"f": bytes(data)}
    # posix_fallocate(3) (glibc calls fallocate mode 0) on a new file
    fd = os.open(m.path / "g", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 100_000)
    finally:
        os.close(fd)
    assert (m.path / "g").read_bytes() == bytes(100_000)
    drain(m)
    assert tree(tmp_path / "dm")["g"] == bytes(100_000)


def test_fallocate_counts_against_the_dirty_bound(make_mount: MountFactory, ftp: Any) -> None:
    """A reservation is counted like a write of that many bytes: with the only mirror down
    and dirty_limit 8 MiB, reserving 16 MiB is ENOSPC and reserves nothing; 1 MiB is fine."""
    m = make_mount({"ftp": {"type": "ftp", **ftp.options(timeout=2)}}, upload_delay=0,
                   dirty_limit=8 << 20)
    from tests.test_mirrors import admin

    m.expect_log(r"unreachable")
    ftp.stop()
    write_file(m.path / "x", b"x")  # its upload finds the mirror down
    m.wait_for(lambda: admin(m, "stats")["mirrors"]["ftp"]["up"] is False, timeout=60)
    fd = os.open(m.path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        expect_errno(errno.ENOSPC, falloc, fd, FALLOC_FL_KEEP_SIZE, 0, 16 << 20)
        assert os.fstat(fd).st_blocks * 512 < 1 << 20
        falloc(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        assert os.fstat(fd).st_blocks * 512 >= 1 << 20
    finally:
        os.close(fd)
    assert os.stat(m.path).st_mode  # the daemon is alive


def test_chmod_chown_utimens(mnt: Mount) -> None:
    p = mnt.path / "f"
    write_file(p, b"x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chown(p, 1234, 5678)  # changing the owner clears set-user-ID
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o751
    os.chmod(p, 0o640)
    t0 = time.time_ns() - 10**8  # the kernel's UTIME_NOW comes from a coarse clock
    os.utime(p)  # UTIME_NOW
    st = os.stat(p)
    t1 = time.time_ns()
    assert t0 <= st.st_mtime_ns <= t1 and t0 <= st.st_atime_ns <= t1
    atime, mtime = 1_234_567_890_123_456_789, 1_500_000_000_987_654_321
    os.utime(p, ns=(atime, mtime))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    os.mkdir(mnt.path / "d")
    os.utime(mnt.path / "d", ns=(atime + 1, mtime + 1))
    os.chmod(mnt.path / "d", 0o700)
    # cp -p, tar, rsync: write, then set times and mode on the descriptor, then close
    fd = os.open(mnt.path / "copy", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"copied" * 10000)
        os.utime(fd, ns=(atime + 2, mtime + 2))
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)
    st = os.stat(mnt.path / "copy")
    assert (st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (mtime + 2, 0o444)
    remount(mnt)
    st = os.stat(mnt.path / "copy")
    assert (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (60000, mtime + 2, 0o444)
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    st = os.stat(mnt.path / "d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime + 1, mtime + 1)
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_statfs(mnt: Mount) -> None:
    s = os.statvfs(mnt.path)
    assert s.f_namemax == 255
    assert s.f_bsize > 0 and s.f_frsize > 0
    assert 0 < s.f_bavail <= s.f_bfree <= s.f_blocks
    assert s.f_files >= s.f_ffree > 0
    host = os.statvfs(cache_dir(mnt))
    assert s.f_blocks * s.f_frsize == host.f_blocks * host.f_frsize


SYNCS = ("fsync", "fdatasync", "msync", "sync_file_range", "syncfs", "sync")


def synced(calls: list[Syscall], path: Path, t0: float, t1: float) -> bool:
    """Whether the daemon synced ``path`` between ``t0`` and ``t1`` (wall clock)."""
    return any(c.path == str(path) and t0 <= c.at <= t1 for c in calls)


def test_fsync_fdatasync(make_mount: MountFactory, tmp_path: Path) -> None:
    """fsync(2) and fdatasync(2) return once the content file is on disk, the new size is
    committed and LMDB is synced (docs/ARCHITECTURE.md, "What is durable when"); fsync of a
    directory syncs LMDB. None of that shows until a power cut, so the daemon runs under
    strace and its sync calls during each of ours are checked; the committed size is read back
    with `stats` while the file is still open (a close would commit it anyway)."""
    from tests.test_mirrors import admin

    trace = tmp_path / "strace.out"
    mnt = make_mount(xattrs=True, start=False)
    mnt.wrapper = strace_command(trace, SYNCS)
    mnt.start()
    lmdb_file = cache_dir(mnt) / "meta" / "data.mdb"
    p = mnt.path / "f"
    windows: list[tuple[str, Path, float, float]] = []
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        content = content_path(mnt, os.fstat(fd).st_ino)
        for data, sync in ((b"synced", os.fsync), (b" data", os.fdatasync)):
            os.write(fd, data)
            t0 = time.time()
            sync(fd)
            t1 = time.time()
            windows += [(sync.__name__, content, t0, t1), (sync.__name__, lmdb_file, t0, t1)]
        assert content.read_bytes() == b"synced data"
        assert admin(mnt, "stats")["bytes"] == len(b"synced data")
    finally:
        os.close(fd)
    dfd = os.open(mnt.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.time()
        os.fsync(dfd)
        t1 = time.time()
        windows.append(("fsync of the directory", lmdb_file, t0, t1))
    finally:
        os.close(dfd)
    assert mnt.umount() == 0  # strace ends with the daemon: its record is complete
    calls = read_trace(trace)
    for what, path, t0, t1 in windows:
        assert synced(calls, path, t0, t1), (what, path.name, calls)


# ----------------------------------------------------------------------------- xattrs


def own_xattrs(p: Path) -> list[str]:
    """The names set by users (``user.mirrorfs.*`` are computed by the mount)."""
    return sorted(n for n in os.listxattr(p) if not n.startswith("user.mirrorfs."))


def test_user_xattrs(mnt: Mount) -> None:
    p = mnt.path / "f"
    write_file(p, b"x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.bin", b"\x00\xff\x00")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.color") == b"blue"
    assert os.getxattr(p, "user.bin") == b"\x00\xff\x00"
    assert os.getxattr(p, "user.empty") == b""
    assert own_xattrs(p) == ["user.bin", "user.color", "user.empty"]
    os.setxattr(p, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    expect_errno(errno.EEXIST, os.setxattr, p, "user.color", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, p, "user.nope")
    os.removexattr(p, "user.bin")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.bin")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.bin")
    expect_errno(errno.ENOTSUP, os.setxattr, p, "trusted.x", b"1")
    big = os.urandom(65536)  # XATTR_SIZE_MAX
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    os.removexattr(p, "user.big")
    # on directories too, and they survive a remount
    os.mkdir(mnt.path / "d")
    os.setxattr(mnt.path / "d", "user.k", b"v")
    remount(mnt)
    assert own_xattrs(p) == ["user.color", "user.empty"]
    assert os.getxattr(p, "user.color") == b"red"
    assert os.getxattr(mnt.path / "d", "user.k") == b"v"


def test_xattrs_off_by_default(make_mount: MountFactory) -> None:
    m = make_mount()
    p = m.path / "f"
    write_file(p, b"x")
    # the daemon answers ENOSYS; the kernel turns that into EOPNOTSUPP for the whole mount
    expect_errno(errno.EOPNOTSUPP, os.getxattr, p, "user.a")
    expect_errno(errno.EOPNOTSUPP, os.setxattr, p, "user.a", b"1")
    expect_errno(errno.EOPNOTSUPP, os.getxattr, p, "user.a")
    expect_errno(errno.EOPNOTSUPP, os.listxattr, p)
    expect_errno(errno.EOPNOTSUPP, os.removexattr, p, "user.a")
    write_file(p, b"writes still work")
    assert p.read_bytes() == b"writes still work"


# ----------------------------------------------------------------------------- big, mmap


def test_file_over_4_gib(mnt: Mount) -> None:
    p = mnt.path / "huge"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 5 * GiB)
        assert os.pwrite(fd, b"beyond", 4 * GiB + 123) == 6
        assert os.pread(fd, 10, 4 * GiB + 121) == b"\0\0beyond\0\0"
        assert os.pwrite(fd, b"end", 5 * GiB) == 3
        assert os.fstat(fd).st_size == 5 * GiB + 3
    finally:
        os.close(fd)
    remount(mnt)
    assert os.stat(p).st_size == 5 * GiB + 3
    with open(p, "rb") as f:
        f.seek(4 * GiB + 123)
        assert f.read(6) == b"beyond"
        f.seek(5 * GiB - 2)
        assert f.read(100) == b"\0\0end"
        f.seek(GiB)
        assert f.read(4096) == bytes(4096)
    data_file = content_path(mnt, os.stat(p).st_ino)
    st = os.stat(data_file)
    assert st.st_size == 5 * GiB + 3
    assert st.st_blocks * 512 < 10 * 1024 * 1024  # still sparse in the cache


def test_mmap_read_write(mnt: Mount) -> None:
    p = mnt.path / "m"
    write_file(p, b"." * 10000)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, 10000) as mm:
            assert mm[:3] == b"..."
            mm[0:5] = b"hello"
            mm[8190:8200] = b"0123456789"  # across a page boundary
            mm.flush()  # msync(MS_SYNC)
    finally:
        os.close(fd)
    expected = b"hello" + b"." * 8185 + b"0123456789" + b"." * 1800
    with open(p, "rb") as f:
        assert f.read() == expected
    fd = os.open(p, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == expected
    finally:
        os.close(fd)
    remount(mnt)
    assert p.read_bytes() == expected
    with open(p, "r+b") as g, mmap.mmap(g.fileno(), 0) as mm:
        mm[-4:] = b"TAIL"  # no msync: unmapping and closing must be enough
    remount(mnt)
    assert p.read_bytes() == expected[:-4] + b"TAIL"


# ----------------------------------------------------------------------------- concurrency


def _writer(path: str, seed: int, size: int, region: int | None) -> None:
    """Write ``size`` bytes derived from ``seed`` (at ``region * size`` in a shared file, or
    as a whole new file), reading each piece back as it goes."""
    data = bytes((seed + i * 7) % 251 for i in range(size))
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if region is None else 0)
    fd = os.open(path, flags, 0o644)
    try:
        base = (region or 0) * size
        for off in range(0, size, 65536):
            piece = data[off:off + 65536]
            os.pwrite(fd, piece, base + off)
            if os.pread(fd, len(piece), base + off) != piece:
                os._exit(3)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_two_processes(mnt: Mount) -> None:
    ctx = multiprocessing.get_context("fork")
    size = 1 << 20
    m = str(mnt.path)
    jobs = [
        (f"{m}/own0", 1, size, None), (f"{m}/own1", 2, size, None),  # different files
        (f"{m}/shared", 3, size, 0), (f"{m}/shared", 4, size, 1),  # one file, two regions
    ]
    for _round in range(2):
        procs = [ctx.Process(target=_writer, args=a) for a in jobs]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join(60)
            assert pr.exitcode == 0

    def expected(seed: int) -> bytes:
        return bytes((seed + i * 7) % 251 for i in range(size))

    assert (mnt.path / "own0").read_bytes() == expected(1)
    assert (mnt.path / "own1").read_bytes() == expected(2)
    assert (mnt.path / "shared").read_bytes() == expected(3) + expected(4)
    # a reader in another process sees what this one writes, while it is open
    fd = os.open(mnt.path / "own0", os.O_WRONLY)
    try:
        os.pwrite(fd, b"LIVE", 0)
        r = subprocess.run(["head", "-c", "4", str(mnt.path / "own0")], capture_output=True,
                           check=True)
        assert r.stdout == b"LIVE"
    finally:
        os.close(fd)
    remount(mnt)
    assert (mnt.path / "shared").read_bytes() == expected(3) + expected(4)
    assert (mnt.path / "own0").read_bytes()[:4] == b"LIVE"


# ----------------------------------------------------------------------------- ownership


@pytest.fixture
def shared(make_mount: MountFactory, other_user: pwd.struct_passwd) -> Iterator[Mount]:
    """A mount other users may use (allow_other); the kernel checks modes."""
    m = make_mount(options=["allow_other"])
    os.chmod(m.path, 0o777)
    yield m


def _create(name: str, mode: int) -> tuple[int, int, int]:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.close(fd)
    st = os.stat(name)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _mkdir(name: str, mode: int) -> tuple[int, int, int]:
    os.mkdir(name, mode)
    st = os.stat(name)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_new_files_belong_to_the_caller(shared: Mount,
                                        other_user: pwd.struct_passwd) -> None:
    u = other_user
    assert as_user(u, shared.path, _create, "mine", 0o644, umask=0o022) == (
        u.pw_uid, u.pw_gid, 0o644)
    assert as_user(u, shared.path, _mkdir, "mydir", 0o755, umask=0o022) == (
        u.pw_uid, u.pw_gid, 0o755)
    as_user(u, shared.path, os.symlink, "mine", "mylink")
    st = os.lstat(shared.path / "mylink")
    assert (st.st_uid, st.st_gid) == (u.pw_uid, u.pw_gid)
    # and root's are root's
    write_file(shared.path / "roots", b"x", 0o644)
    st = os.stat(shared.path / "roots")
    assert (st.st_uid, st.st_gid) == (0, 0)
    # the owner may chmod; another user may not
    as_user(u, shared.path, os.chmod, "mine", 0o600)
    assert stat.S_IMODE(os.stat(shared.path / "mine").st_mode) == 0o600
    with pytest.raises(OSError) as info:
        as_user(u, shared.path, os.chmod, "roots", 0o666)
    assert info.value.errno == errno.EPERM
    remount(shared)
    st = os.stat(shared.path / "mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (u.pw_uid, u.pw_gid, 0o600)


def test_umask_respected(shared: Mount, other_user: pwd.struct_passwd) -> None:
    u = other_user
    assert as_user(u, shared.path, _create, "f", 0o666, umask=0o027)[2] == 0o640
    assert as_user(u, shared.path, _mkdir, "d", 0o777, umask=0o027)[2] == 0o750
    assert as_user(u, shared.path, _create, "g", 0o666, umask=0o077)[2] == 0o600
    old = os.umask(0o002)
    try:
        assert _create(str(shared.path / "h"), 0o666)[2] == 0o664
    finally:
        os.umask(old)


def test_setgid_directory(shared: Mount, other_user: pwd.struct_passwd) -> None:
    d = shared.path / "proj"
    os.mkdir(d)
    os.chown(d, 0, other_user.pw_gid)
    os.chmod(d, 0o2777)
    # root (gid 0) creates: the directory's group wins, and subdirs inherit the bit
    write_file(d / "f", b"x")
    assert os.stat(d / "f").st_gid == other_user.pw_gid
    os.mkdir(d / "sub")
    st = os.stat(d / "sub")
    assert st.st_gid == other_user.pw_gid and st.st_mode & stat.S_ISGID
    write_file(d / "sub" / "g", b"x")
    assert os.stat(d / "sub" / "g").st_gid == other_user.pw_gid
    # outside the setgid directory, the caller's group as usual
    write_file(shared.path / "plain", b"x")
    assert os.stat(shared.path / "plain").st_gid == 0


def test_sticky_directory(shared: Mount, other_user: pwd.struct_passwd) -> None:
    u = other_user
    t = shared.path / "tmp"
    os.mkdir(t)
    os.chmod(t, 0o1777)
    write_file(t / "roots", b"x", 0o666)
    as_user(u, t, _create, "users", 0o644)
    # another user's file in a sticky directory: not removable or replaceable by rename
    with pytest.raises(OSError) as info:
        as_user(u, t, os.unlink, "roots")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        as_user(u, t, os.rename, "users", "roots")
    assert info.value.errno == errno.EPERM
    assert (t / "roots").exists()
    # one's own file is
    as_user(u, t, os.unlink, "users")
    assert os.listdir(t) == ["roots"]
    # without the sticky bit the same unlink is allowed (write permission on the dir)
    os.chmod(t, 0o777)
    as_user(u, t, os.unlink, "roots")
    assert os.listdir(t) == []


def test_permissions_enforced(shared: Mount, other_user: pwd.struct_passwd) -> None:
    u = other_user
    write_file(shared.path / "secret", b"root only", 0o600)
    os.chmod(shared.path / "secret", 0o600)

    def read(name: str) -> bytes:
        with open(name, "rb") as f:
            return f.read()

    with pytest.raises(OSError) as info:
        as_user(u, shared.path, read, "secret")
    assert info.value.errno == errno.EACCES
    with pytest.raises(OSError) as info:
        as_user(u, shared.path, write_file, "secret", b"overwrite")
    assert info.value.errno == errno.EACCES
    os.chmod(shared.path / "secret", 0o604)
    assert as_user(u, shared.path, read, "secret") == b"root only"
    # a directory without write permission for others
    os.mkdir(shared.path / "ro", 0o755)
    with pytest.raises(OSError) as info:
        as_user(u, shared.path, _create, "ro/x", 0o644)
    assert info.value.errno == errno.EACCES
    # without search permission, nothing inside is reachable
    write_file(shared.path / "ro" / "inner", b"x", 0o644)
    os.chmod(shared.path / "ro", 0o700)
    with pytest.raises(OSError) as info:
        as_user(u, shared.path, os.stat, "ro/inner")
    assert info.value.errno == errno.EACCES
    assert (shared.path / "secret").read_bytes() == b"root only"
    # another user writing to a set-user-ID file clears the bit, as on a local disk
    write_file(shared.path / "suid", b"#!/bin/sh\n", 0o755)
    os.chmod(shared.path / "suid", 0o4777)

    def append(name: str) -> None:
        with open(name, "ab") as f:
            f.write(b"exit 0\n")

    as_user(u, shared.path, append, "suid")
    st = os.stat(shared.path / "suid")
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert (shared.path / "suid").read_bytes() == b"#!/bin/sh\nexit 0\n"


# ----------------------------------------------------------------------------- errno


def test_errno_cases(mnt: Mount) -> None:
    m = mnt.path
    write_file(m / "f", b"x")
    os.mkdir(m / "d")
    write_file(m / "d" / "inner", b"x")
    expect_errno(errno.ENOENT, os.open, m / "missing", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.stat, m / "missing")
    expect_errno(errno.ENOENT, os.unlink, m / "missing")
    expect_errno(errno.ENOENT, os.open, m / "nodir" / "f", os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.EEXIST, os.mkdir, m / "f")
    expect_errno(errno.EEXIST, os.mkdir, m / "d")
    expect_errno(errno.EEXIST, os.symlink, "x", m / "d")
    expect_errno(errno.ENOTDIR, os.open, m / "f" / "x", os.O_RDONLY)
    expect_errno(errno.ENOTDIR, os.mkdir, m / "f" / "x")
    expect_errno(errno.ENOTDIR, os.listdir, m / "f")
    expect_errno(errno.ENOTDIR, os.open, m / "f", os.O_RDONLY | os.O_DIRECTORY)
    expect_errno(errno.EISDIR, os.open, m / "d", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, m / "d", os.O_RDWR)
    expect_errno(errno.EISDIR, os.unlink, m / "d")
    expect_errno(errno.ENOTEMPTY, os.rmdir, m / "d")
    expect_errno(errno.EINVAL, os.rmdir, f"{m}/d/.")
    long_ok, too_long = "n" * 255, "n" * 256
    write_file(m / long_ok, b"255")
    assert (m / long_ok).read_bytes() == b"255"
    os.mkdir(m / ("d" * 255))
    expect_errno(errno.ENAMETOOLONG, os.open, m / too_long, os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENAMETOOLONG, os.stat, m / too_long)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, m / too_long)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "x", m / too_long)
    expect_errno(errno.ENAMETOOLONG, os.rename, m / "f", m / too_long)
    assert sorted(os.listdir(m)) == sorted(["d", "f", long_ok, "d" * 255])


def test_odd_names(mnt: Mount) -> None:
    """Names are bytes: spaces, newlines, backslashes, non-UTF-8 bytes, long UTF-8 names."""
    m = os.fsencode(mnt.path)
    names = [b"with space", b"new\nline", b"back\\slash", b"\xff\xfe not utf-8",
             "é".encode() * 127, b"-dash", b"...", b"*?[glob]"]
    for i, n in enumerate(names):
        write_file(m + b"/" + n, b"%d" % i)
    assert sorted(os.listdir(m)) == sorted(names)
    remount(mnt)
    for i, n in enumerate(names):
        with open(m + b"/" + n, "rb") as f:
            assert f.read() == b"%d" % i
    os.rename(m + b"/" + names[3], m + b"/\x80")
    assert os.path.exists(m + b"/\x80")


# ----------------------------------------------------------------------------- durability


def test_acknowledged_data_survives_sigkill(mnt: Mount) -> None:
    m = mnt.path
    closed = os.urandom(300_000)
    write_file(m / "closed", closed, 0o640)
    os.chmod(m / "closed", 0o604)
    synced = os.urandom(200_000)
    fd = os.open(m / "synced", os.O_RDWR | os.O_CREAT, 0o600)
    gfd = -1
    try:
        os.write(fd, synced)
        os.fsync(fd)
        os.makedirs(m / "dir" / "sub")
        write_file(m / "dir" / "sub" / "f", b"nested")
        os.utime(m / "dir" / "sub" / "f", ns=(1_000_000_123, 2_000_000_456))
        write_file(m / "old-name", b"renamed")
        os.rename(m / "old-name", m / "dir" / "new-name")
        write_file(m / "gone", b"unlinked while open")
        gfd = os.open(m / "gone", os.O_RDONLY)
        gone = content_path(mnt, os.fstat(gfd).st_ino)
        os.unlink(m / "gone")
        before = {n: os.stat(m / n) for n in ("closed", "synced", "dir/sub/f", "dir")}
        mnt.kill()
    finally:
        for f in (fd, gfd):
            with contextlib.suppress(OSError):
                os.close(f)  # the mount is gone: ENOTCONN
    assert gone.exists()  # the daemon died holding it
    mnt.start()
    assert not gone.exists()  # startup repair dropped the orphan
    assert sorted(os.listdir(m)) == ["closed", "dir", "synced"]
    assert (m / "dir" / "new-name").read_bytes() == b"renamed"
    assert (m / "closed").read_bytes() == closed
    assert (m / "synced").read_bytes() == synced
    assert (m / "dir" / "sub" / "f").read_bytes() == b"nested"
    for name, st in before.items():
        now = os.stat(m / name)
        assert (now.st_size, now.st_mode, now.st_uid, now.st_gid, now.st_mtime_ns) == (
            st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), name
    assert os.stat(m / "dir" / "sub" / "f").st_atime_ns == 1_000_000_123


def test_startup_repair_after_crash_cleans_the_cache_dir(mnt: Mount) -> None:
    """A crash can leave partial downloads (``.part``) and content files whose inode is gone;
    the startup check after a crash removes them and keeps every real content file."""
    inos = []
    for i in range(20):
        write_file(mnt.path / f"f{i}", b"content %d" % i)
        inos.append(os.stat(mnt.path / f"f{i}").st_ino)
    write_file(mnt.path / "orphan", b"unlinked while open")
    fd = os.open(mnt.path / "orphan", os.O_RDONLY)
    orphan = content_path(mnt, os.fstat(fd).st_ino)
    os.unlink(mnt.path / "orphan")
    mnt.kill()
    with contextlib.suppress(OSError):
        os.close(fd)
    for path in [*(content_path(mnt, ino) for ino in inos), orphan]:
        path.with_suffix(".part").write_bytes(b"partial")
    stray = content_path(mnt, 0xABCDEF)
    stray.write_bytes(b"stray")
    stray.with_suffix(".part").write_bytes(b"stray partial")
    mnt.start()
    assert not stray.exists() and not stray.with_suffix(".part").exists()
    assert not orphan.exists() and not orphan.with_suffix(".part").exists()
    for i, ino in enumerate(inos):
        assert not content_path(mnt, ino).with_suffix(".part").exists(), i
        assert (mnt.path / f"f{i}").read_bytes() == b"content %d" % i


# ----------------------------------------------------------------------------- timestamps


def _tick() -> None:
    time.sleep(0.02)  # the kernel's clock for file times is coarse (jiffies)


def test_timestamps(mnt: Mount) -> None:
    m = mnt.path
    d = m / "d"
    os.mkdir(d)
    d0 = os.stat(d)
    _tick()
    write_file(d / "f", b"one")  # creating a file changes the parent's mtime and ctime
    d1 = os.stat(d)
    assert d1.st_mtime_ns > d0.st_mtime_ns and d1.st_ctime_ns > d0.st_ctime_ns
    f0 = os.stat(d / "f")
    _tick()
    fd = os.open(d / "f", os.O_WRONLY)
    try:
        os.write(fd, b"two")  # writing changes mtime and ctime (seen before close)
        f1 = os.fstat(fd)
        assert f1.st_mtime_ns > f0.st_mtime_ns and f1.st_ctime_ns > f0.st_ctime_ns
    finally:
        os.close(fd)
    f2 = os.stat(d / "f")
    assert f2.st_mtime_ns == f1.st_mtime_ns
    _tick()
    os.chmod(d / "f", 0o600)  # chmod changes ctime only
    f3 = os.stat(d / "f")
    assert f3.st_mtime_ns == f2.st_mtime_ns and f3.st_ctime_ns > f2.st_ctime_ns
    assert f3.st_atime_ns == f2.st_atime_ns
    _tick()
    os.unlink(d / "f")  # removing changes the parent's times
    d2 = os.stat(d)
    assert d2.st_mtime_ns > d1.st_mtime_ns and d2.st_ctime_ns > d1.st_ctime_ns
    _tick()
    write_file(m / "g", b"g")
    g0 = os.stat(m / "g")
    _tick()
    os.truncate(m / "g", 0)  # truncation is a change of content: mtime and ctime
    g1 = os.stat(m / "g")
    assert g1.st_mtime_ns > g0.st_mtime_ns and g1.st_ctime_ns > g0.st_ctime_ns
    _tick()
    os.rename(m / "g", m / "h")  # rename changes the file's ctime, not its mtime
    h = os.stat(m / "h")
    assert h.st_mtime_ns == g1.st_mtime_ns and h.st_ctime_ns >= g1.st_ctime_ns
    # a file written, closed a little later, then left alone
    fd = os.open(m / "w", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"written")
        _tick()
    finally:
        os.close(fd)
    w = os.stat(m / "w")
    # the daemon kept the same times the kernel showed: nothing changed, so neither did they
    remount(mnt)
    assert os.stat(d).st_mtime_ns == d2.st_mtime_ns
    assert os.stat(m / "h").st_mtime_ns == h.st_mtime_ns
    for name, before in (("w", w), ("h", h)):
        after = os.stat(m / name)
        assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns,
                                                          before.st_ctime_ns), name


def test_times_never_go_backwards(mnt: Mount) -> None:
    """A write right after a create must not get an older mtime than the create gave: the
    kernel stamps writes with its coarse clock, so the daemon must use the same clock."""
    for i in range(20):
        p = mnt.path / f"f{i}"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            created = os.fstat(fd)
            os.write(fd, b"x")
            written = os.fstat(fd)
        finally:
            os.close(fd)
        assert written.st_mtime_ns >= created.st_mtime_ns, i
        assert written.st_ctime_ns >= created.st_ctime_ns, i
        os.chmod(p, 0o600)  # a daemon-side change after kernel-side ones
        assert os.stat(p).st_ctime_ns >= written.st_ctime_ns, i


def test_a_small_file_is_journaled_once(make_mount: MountFactory, tmp_path: Path) -> None:
    """Create, write, close: one commit, one journal change. The new inode carries the time
    the kernel stamps the write with (the cache file's ctime), so the kernel sends no
    SETATTR of the times at close, which committed and journaled almost every small file a
    second time. (A kernel may still send one when its clock moved between create and write,
    so most files, not all, are checked.)"""
    from mirrorfs.cache.db import MQ, Database, Job

    (tmp_path / "mirror").mkdir()
    m = make_mount({"d": {"type": "dir", "path": str(tmp_path / "mirror")}},
                   upload_delay=3600)
    inos = []
    for i in range(20):
        fd = os.open(m.path / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
        inos.append(os.stat(m.path / f"f{i}").st_ino)
    assert m.umount() == 0
    db = Database(str(cache_dir(m) / "meta"), readonly=True)
    try:
        with db.begin() as txn:
            v = txn.get(b"d", db=db.db["mirrors"])
            assert v is not None
            idx = int.from_bytes(v, "big")
            jobs = [txn.get(MQ.pack(idx, ino), db=db.db["jobs"]) for ino in inos]
            assert all(j is not None for j in jobs), "every file has a job"
            seqs = [Job.unpack(j).seq for j in jobs if j is not None]
    finally:
        db.close()
    assert sum(seq == 1 for seq in seqs) >= len(seqs) // 2, seqs


def test_mount_is_mounted_helper(mnt: Mount) -> None:
    """Sanity check of the harness itself: the mount is a FUSE mount of our daemon."""
    assert is_mounted(mnt.path)
    with open("/proc/self/mounts") as f:
        line = next(line for line in f if line.split()[1] == str(mnt.path))
    assert line.split()[0] == str(mnt.config) and line.split()[2] == "fuse.mirrorfs"
