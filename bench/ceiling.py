#!/usr/bin/env python3
"""The stack's ceiling: a careful pyfuse3 + trio passthrough of a directory.

    .venv/bin/python bench/ceiling.py SOURCE_DIR MOUNTPOINT

What any design on our stack (pyfuse3, trio, one Python process) can reach, measured next to
mirrorfs by bench/run.py: the kernel's writeback cache on, no xattr handlers (the kernel stops
asking ``security.capability`` on every write), entry and attribute timeouts of 300 s, negative
entries cached, ``keep_cache`` on open, and every read and write an inline ``os.pread`` /
``os.pwrite`` on a descriptor in the handler (no thread hop). No journal, no registry, no
uploads: each request is the syscall it maps to and nothing else.

Inodes are the source's inode numbers (the root is pyfuse3's ROOT_INODE); an inode's path is
the last name it was looked up, created or linked under. Forgets are ignored (a benchmark
mount lives for minutes). Runs in the foreground until unmounted (``fusermount3 -u``).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

TIMEOUT = 300.0


def oserror(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A handler raises only FUSEError: an OSError becomes its errno."""
    @functools.wraps(fn)
    async def wrapped(*args: Any) -> Any:
        try:
            return await fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    return wrapped


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.dirs: dict[int, tuple[str, list[tuple[bytes, os.stat_result]]]] = {}
        self.next_dh = 1

    def _path(self, ino: int, name: bytes | None = None) -> str:
        try:
            p = self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        return p if name is None else os.path.join(p, os.fsdecode(name))

    def _entry(self, st: os.stat_result, path: str | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        ino = pyfuse3.ROOT_INODE if path == self.paths[pyfuse3.ROOT_INODE] else st.st_ino
        if path is not None:
            self.paths[ino] = path
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_rdev, a.st_size, a.st_blksize, a.st_blocks = (st.st_rdev, st.st_size, st.st_blksize,
                                                           st.st_blocks)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _stat(self, path: str) -> pyfuse3.EntryAttributes:
        return self._entry(os.lstat(path), path)

    @oserror
    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        try:
            return self._stat(self._path(parent, name))
        except FileNotFoundError:
            a = pyfuse3.EntryAttributes()  # a negative entry: every change comes through here
            a.st_ino = 0
            a.entry_timeout = TIMEOUT
            return a

    @oserror
    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(os.lstat(self._path(ino)))

    @oserror
    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        p = self._path(ino)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(p, attr.st_size)
        if fields.update_mode:
            os.chmod(p, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.lchown(p, attr.st_uid if fields.update_uid else -1,
                      attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(p)
            os.utime(p, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                            attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self._entry(os.lstat(p))

    @oserror
    async def readlink(self, ino: int, ctx: Any) -> bytes:
        return os.fsencode(os.readlink(self._path(ino)))

    @oserror
    async def opendir(self, ino: int, ctx: Any) -> int:
        fh, self.next_dh = self.next_dh, self.next_dh + 1
        self.dirs[fh] = (self._path(ino), [])
        return fh

    @oserror
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        base, entries = self.dirs[fh]
        if start_id == 0:  # listed once per handle, so removals while reading shift nothing
            with os.scandir(base) as it:
                entries[:] = [(os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in it]
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            a = self._entry(st, os.path.join(base, os.fsdecode(name)))
            if not pyfuse3.readdir_reply(token, name, a, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @staticmethod
    def _flags(flags: int) -> int:
        # with the writeback cache the kernel reads pages of write-only files and does appends
        # itself (libfuse's passthrough_ll does the same)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    @oserror
    async def open(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fd = os.open(self._path(ino), self._flags(flags) & ~os.O_CREAT)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @oserror
    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        p = self._path(parent, name)
        fd = os.open(p, self._flags(flags) | os.O_CREAT, mode)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._entry(os.fstat(fd), p)

    @oserror
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @oserror
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    @oserror
    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    @oserror
    async def release(self, fh: int) -> None:
        os.close(fh)

    @oserror
    async def mkdir(self, parent: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        p = self._path(parent, name)
        os.mkdir(p, mode)
        return self._stat(p)

    @oserror
    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        p = self._path(parent, name)
        os.symlink(target, p)
        return self._stat(p)

    @oserror
    async def link(self, ino: int, parent: int, name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        p = self._path(parent, name)
        os.link(self._path(ino), p)
        return self._stat(p)

    def _forget_path(self, p: str) -> None:
        st = os.lstat(p)
        if self.paths.get(st.st_ino) == p:
            del self.paths[st.st_ino]

    @oserror
    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        p = self._path(parent, name)
        self._forget_path(p)
        os.unlink(p)

    @oserror
    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        p = self._path(parent, name)
        self._forget_path(p)
        os.rmdir(p)

    @oserror
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._path(parent_old, name_old), self._path(parent_new, name_new)
        st = os.lstat(old)
        os.rename(old, new)
        self.paths[st.st_ino] = new
        if stat.S_ISDIR(st.st_mode):  # the paths under it moved too
            pre = old + "/"
            for ino, p in list(self.paths.items()):
                if p.startswith(pre):
                    self.paths[ino] = new + p[len(old):]

    @oserror
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        v = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree = v.f_bsize, v.f_frsize, v.f_blocks, v.f_bfree
        s.f_bavail, s.f_files, s.f_ffree, s.f_favail = v.f_bavail, v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = v.f_namemax
        return s


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, mnt = os.path.abspath(sys.argv[1]), sys.argv[2]
    opts = set(pyfuse3.default_options)
    opts.add("fsname=ceiling")
    pyfuse3.init(Passthrough(source), mnt, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
