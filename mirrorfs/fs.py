"""pyfuse3 Operations: thin handlers over the registry (LMDB) and the store (content files).

Owns the open-file table. Everything here runs in the trio thread; reads and writes of cache
files are inline ``os.pread``/``os.pwrite`` (a thread hop costs more than the I/O). fsync
goes to a thread because it may block for long. A write() does not touch LMDB except on the
first write after a commit (to mark the inode as being written); the new size and version
are committed at flush (close), fsync and release -- that is what "acknowledged" means.

A handler may raise only FUSEError: :func:`handler` maps domain errors through
``errors.to_errno`` and logs anything unexpected with the path before answering EIO.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import inspect
import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from mirrorfs.cache.db import F_ORPHAN, LOCAL_FULL, ROOT_INO, Inode
from mirrorfs.cache.fetch import FH_BASE
from mirrorfs.cache.registry import FsError, Registry, now_ns
from mirrorfs.errors import MirrorfsError, to_errno

if TYPE_CHECKING:
    from mirrorfs.cache.fetch import Fetcher
    from mirrorfs.cache.store import Store
    from mirrorfs.space import Space
    from mirrorfs.stats import RuntimeStats

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: the fallocate(2) modes served, on the cache file (where its file system has them)
FALLOCATE_MODES = frozenset({0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) with its modes (the os module has only posix_fallocate)."""
    if _libc.fallocate(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

P = ParamSpec("P")
T = TypeVar("T")


#: the handler arguments an error line may name: numbers that identify, never contents (a
#: write's buffer is file data, a setxattr's value may be a secret, names may be private)
_LOGGED_ARGS = ("inode", "parent_inode", "fh", "off", "size", "parent_inode_old",
                "parent_inode_new", "new_parent_inode", "flags")


def handler(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn every exception into a FUSEError; an unexpected one is a logged bug, not a crash.

    This is the one place where domain errors become errno values (errors.to_errno)."""
    params = list(inspect.signature(fn).parameters)[1:]  # without self
    logged = [(i, p) for i, p in enumerate(params) if p in _LOGGED_ARGS]

    def where(args: tuple[Any, ...]) -> str:
        return fn.__name__ + "(" + ", ".join(
            f"{p}={args[i + 1]}" for i, p in logged if i + 1 < len(args)) + ")"

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except (FsError, MirrorfsError, OSError) as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s", where(args), exc)
            raise FUSEError(to_errno(exc)) from None
        except Exception:
            log.exception("unexpected error in %s", where(args))
            raise FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class OpenFile:
    """One content-file descriptor per inode, shared by every handle on it.

    Normally the inode's current one (``Operations.open_files``); a pull that replaces the
    content file detaches it (:meth:`Operations.detach`): its handles keep the old content
    until they are released, new opens get a new OpenFile."""

    ino: int
    fd: int
    refs: int = 0
    writers: int = 0
    dirty: bool = False  # data written since the last commit
    write_gen: int = 0  # bumped by every write: the uploader detects changes during upload
    written: int = 0  # bytes written since the last commit (dirty-data estimate)
    times: dict[str, int] = field(default_factory=dict)  # set by the kernel, not yet committed


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(self, registry: Registry, store: Store, *, attr_timeout: float = 300.0,
                 xattrs: bool = False, readonly: bool = False, stream_direct_io: bool = False,
                 fetcher: Fetcher | None = None, space: Space | None = None,
                 stats: RuntimeStats | None = None) -> None:
        super().__init__()
        self.reg = registry
        self.store = store
        self.attr_timeout = attr_timeout
        self.xattrs = xattrs
        #: FOPEN_DIRECT_IO on opens of files that are not in the cache (see config.py)
        self.stream_direct_io = stream_direct_io
        self.readonly = readonly
        self.fetcher = fetcher
        self.space = space
        self.stats = stats
        #: inode -> its current OpenFile (the one new opens share)
        self.open_files: dict[int, OpenFile] = {}
        #: handle -> (its OpenFile, opened for writing). One handle per open/create, numbered
        #: below fetch.FH_BASE, where the handles of downloads start.
        self.handles: dict[int, tuple[OpenFile, bool]] = {}
        #: inode -> how many detached OpenFiles still have handles on it
        self.detached: dict[int, int] = {}
        self._fhs = itertools.count(1)
        # directory handle -> (inode, listing taken at offset 0)
        self.open_dirs: dict[int, tuple[int, list[tuple[bytes, int]]]] = {}
        self._dir_fhs = itertools.count(1)
        self.fsync_limiter = trio.CapacityLimiter(4)
        registry.is_open = self.is_open
        registry.entry_added = self._entry_added
        self.on_commit: Callable[[Inode], None] = lambda node: None
        #: inodes whose kernel caches are being dropped after a failed write (and those that
        #: failed again meanwhile): see _forget_unstored
        self._forgetting: set[int] = set()
        self._forget_again: set[int] = set()

    def _entry_added(self, parent: int, name: bytes) -> None:
        """A name appeared without a request of the kernel's (import, pull): the kernel may
        hold a negative entry for it and the directory's old attributes for ``attr_timeout``.
        Queued: the notification is written by pyfuse3's thread once the mount runs."""
        with contextlib.suppress(OSError, RuntimeError):
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    def is_open(self, ino: int) -> bool:
        return ino in self.open_files or ino in self.detached or (
            self.fetcher is not None and self.fetcher.has_handles(ino))

    # ------------------------------------------------------------ attributes

    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        size = node.size
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        of = self.open_files.get(node.ino)
        if of is not None and of.dirty:
            size = os.fstat(of.fd).st_size
            for name, value in of.times.items():
                setattr(a, "st_" + name, value)
        a.st_size = size
        a.st_blksize = 128 * 1024
        a.st_blocks = (size + 511) // 512
        if of is not None:  # space reserved past the end (fallocate KEEP_SIZE) shows too
            a.st_blocks = max(a.st_blocks, os.fstat(of.fd).st_blocks)
        return a

    def _node(self, ino: int) -> Inode:
        node = self.reg.get(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _check_writable(self) -> None:
        if self.readonly:
            raise FUSEError(errno.EROFS)

    @handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attrs(self._node(parent_inode))
        if name == b"..":
            p = self._node(parent_inode)
            return self._attrs(self._node(p.parent if parent_inode != ROOT_INO else ROOT_INO))
        node = self.reg.lookup(parent_inode, name)
        if node is None:
            if len(name) > 255:
                raise FUSEError(errno.ENAMETOOLONG)
            # A negative entry the kernel may cache: every change goes through this mount.
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.attr_timeout
            return a
        return self._attrs(node)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        of = self.open_files.get(inode)
        if of is None and self.reg.get(inode) is None:
            # The kernel writes back the times of every file it unlinks (a SETATTR right
            # after the UNLINK): answered from a read transaction, not a write one.
            raise FUSEError(errno.ENOENT)
        if (of is not None and of.dirty and not (fields.update_size or fields.update_mode
                                                 or fields.update_uid or fields.update_gid)):
            # Times on a file being written (the kernel sends them before every flush with
            # the writeback cache; cp -p sets them before close): committed with the content
            # at the next flush, one LMDB transaction instead of two.
            if fields.update_atime:
                of.times["atime_ns"] = attr.st_atime_ns
            if fields.update_mtime:
                of.times["mtime_ns"] = attr.st_mtime_ns
            of.times["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else now_ns()
            return self._attrs(self._node(inode))
        size = None
        if fields.update_size:
            node = self._node(inode)
            if not stat.S_ISREG(node.mode):
                raise FUSEError(errno.EINVAL)
            size = attr.st_size
            if size == 0:
                self._local_empty(node)
            else:
                await self._ensure_local(node)
            of = self.open_files.get(inode)
            if of is not None:
                self._commit_if_dirty(of)
                os.ftruncate(of.fd, size)
            else:
                fd = self.store.open(inode)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        node = self.reg.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        if size is not None:
            self.on_commit(node)
        return self._attrs(node)

    # ------------------------------------------------------------ namespace

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self.reg.mknode(parent_inode, name, mode, ctx.uid, ctx.gid, rdev=rdev)
        if stat.S_ISREG(mode):
            self.store.create_empty(node.ino)
        return self._attrs(node)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self.reg.mknode(parent_inode, name, stat.S_IFDIR | (mode & 0o7777),
                               ctx.uid, ctx.gid)
        return self._attrs(node)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self.reg.mknode(parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid,
                               target=target)
        return self._attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return node.target

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self.reg.link(inode, new_parent_inode, new_name)
        self.on_commit(node)  # wakes the uploader: the new path is a change to upload
        return self._attrs(node)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        node, gone = self.reg.unlink(parent_inode, name, want_dir=False)
        if gone and stat.S_ISREG(node.mode):
            self._drop_content(node.ino)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        self.reg.unlink(parent_inode, name, want_dir=True)

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        _node, replaced, gone = self.reg.rename(parent_inode_old, name_old, parent_inode_new,
                                                name_new, flags)
        if replaced is not None and gone and stat.S_ISREG(replaced.mode):
            self._drop_content(replaced.ino)

    # ------------------------------------------------------------ files

    async def _ensure_local(self, node: Inode) -> None:
        """A file whose content is only on the mirrors must be fetched before it is changed."""
        if node.local != LOCAL_FULL:
            if self.fetcher is None:
                raise FUSEError(errno.EIO)
            await self.fetcher.fetch_all(node)

    def _local_empty(self, node: Inode) -> None:
        """A remote-only file about to be emptied (O_TRUNC, truncate to 0) needs none of its
        old content: start from an empty local file instead of downloading it (which also
        failed while the mirrors were unreachable). The caller then sets size 0."""
        if node.local == LOCAL_FULL:
            return
        self.store.create_empty(node.ino)
        self.reg.make_local(node.ino)

    def _open_file(self, ino: int, create: bool = False) -> OpenFile:
        of = self.open_files.get(ino)
        if of is None:
            of = OpenFile(ino, self.store.open(ino, create=create))
            self.open_files[ino] = of
        of.refs += 1
        return of

    def _new_handle(self, of: OpenFile, writing: bool) -> int:
        fh = next(self._fhs)
        if fh >= FH_BASE:  # after 2**48 opens: number again, around the handles still open
            self._fhs = itertools.count(1)
            fh = next(self._fhs)
        while fh in self.handles:
            fh = next(self._fhs)
        self.handles[fh] = (of, writing)
        return fh

    def _of(self, fh: int) -> OpenFile | None:
        entry = self.handles.get(fh)
        return entry[0] if entry is not None else None

    def detach(self, ino: int) -> None:
        """The content file of ``ino`` is about to be replaced (a pull takes another node's
        version): the handles open on it keep the old file until released, the next open
        opens the new one. The caller checked that none of them writes (``_dirty_here``): a
        commit from a detached handle would describe the old file."""
        of = self.open_files.pop(ino, None)
        if of is not None:
            self.detached[ino] = self.detached.get(ino, 0) + 1

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writing = flags & (os.O_WRONLY | os.O_RDWR) != 0
        if writing or flags & os.O_TRUNC:
            self._check_writable()
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        if node.local != LOCAL_FULL:
            if flags & os.O_TRUNC:
                self._local_empty(node)
            elif writing:
                await self._ensure_local(node)
            elif self.fetcher is not None:
                fh = self.fetcher.open_remote(node)
                return pyfuse3.FileInfo(fh=fh, keep_cache=True,
                                        direct_io=self.stream_direct_io)
        of = self._open_file(inode)
        if writing:
            of.writers += 1
        if self.space is not None:
            self.space.touch(inode)
        if self.stats is not None:
            self.stats.bump("hits")
        if flags & os.O_TRUNC and (node.size or os.fstat(of.fd).st_size):
            # The kernel asks for atomic O_TRUNC (libfuse's default): truncate here, also for
            # O_RDONLY (Linux truncates then too). The content file may hold written-back
            # data not yet committed (registry size 0).
            os.ftruncate(of.fd, 0)
            self.on_commit(self.reg.setattr(inode, size=0))
        return pyfuse3.FileInfo(fh=self._new_handle(of, writing), keep_cache=True)

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        self._check_writable()
        made: list[tuple[int, int]] = []  # (ino, descriptor) of the content file

        def make_content(ino: int) -> int:
            fd = self.store.open(ino, create=True)
            made.append((ino, fd))
            return os.fstat(fd).st_ctime_ns

        try:
            node = self.reg.mknode(parent_inode, name, stat.S_IFREG | (mode & 0o7777),
                                   ctx.uid, ctx.gid, opened=True, content=make_content)
        except BaseException:
            for ino, fd in made:  # the transaction failed after the content file was made
                os.close(fd)
                self.store.remove(ino)
            raise
        of = self.open_files[node.ino] = OpenFile(node.ino, made[0][1], refs=1)
        of.writers += 1
        of.dirty = True  # committed (and journaled) at the first flush, even if empty
        if self.space is not None:
            self.space.touch(node.ino)
        return pyfuse3.FileInfo(fh=self._new_handle(of, True), keep_cache=True), self._attrs(node)

    @handler
    async def read(  # type: ignore[override]  # pyfuse3 replies with any contiguous buffer
            self, fh: int, off: int, size: int) -> bytes | memoryview:
        of = self._of(fh)
        if of is None:
            if self.fetcher is not None and self.fetcher.owns(fh):
                return await self.fetcher.read(fh, off, size)
            raise FUSEError(errno.EBADF)
        return os.pread(of.fd, size, off)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        of = self._of(fh)
        if of is None:
            raise FUSEError(errno.EBADF)
        try:
            return await self._write(of, off, buf)
        except Exception:
            self._forget_unstored(of.ino)
            raise

    def _forget_unstored(self, ino: int) -> None:
        """A write (or the commit after it) of ``ino`` failed, e.g. ENOSPC: the kernel's
        page cache may hold bytes we never stored (with the writeback cache, everything the
        application wrote), and readers on this mount would see them until the inode left
        the kernel's cache. Drop its pages, and its entry, so that the inode leaves the
        kernel once the writer closes it and the next lookup takes the stored size (with
        the writeback cache the kernel never takes a size from us for an inode it holds).

        From a thread, not awaited: the kernel first writes back the inode's dirty pages,
        which are requests this thread must answer (pull.py does the same)."""
        if ino in self._forgetting:
            self._forget_again.add(ino)
            return
        self._forgetting.add(ino)
        node = self.reg.get(ino)
        entry = (node.parent, node.name) if node is not None and node.name and \
            not node.flags & F_ORPHAN else None
        token = trio.lowlevel.current_trio_token()

        def work() -> None:
            try:
                with contextlib.suppress(OSError, RuntimeError):
                    pyfuse3.invalidate_inode(ino, False)
                if entry is not None:
                    with contextlib.suppress(OSError, RuntimeError):
                        pyfuse3.invalidate_entry(entry[0], entry[1])
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done)

        def done() -> None:
            self._forgetting.discard(ino)
            if ino in self._forget_again:
                self._forget_again.discard(ino)
                self._forget_unstored(ino)
            elif self.stats is not None:
                self.stats.bump("unstored_pages_dropped")

        threading.Thread(target=work, name="mirrorfs-forget", daemon=True).start()

    async def _write(self, of: OpenFile, off: int, buf: bytes) -> int:
        if self.space is not None:
            await self.space.reserve_write(of, off, len(buf))
        if not of.dirty:
            self.reg.mark_open_write(of.ino)
            of.dirty = True
        of.write_gen += 1
        of.written += len(buf)
        # All or an error: a short count is what pwrite gives when the disk fills up mid-way,
        # and the kernel's writeback ignores short counts, so the rest would be lost while
        # close() succeeds. Writing the rest raises ENOSPC, which close() then reports.
        done = os.pwrite(of.fd, buf, off)
        while done < len(buf):
            done += os.pwrite(of.fd, memoryview(buf)[done:], off + done)
        return done

    def _commit_if_dirty(self, of: OpenFile) -> None:
        if of.dirty:
            size = os.fstat(of.fd).st_size
            try:
                node = self.reg.commit_content(of.ino, size, times=of.times)
            except Exception:
                self._forget_unstored(of.ino)
                raise
            of.times = {}
            of.dirty = False
            if self.space is not None:
                self.space.committed(of.written)
            of.written = 0
            self.on_commit(node)

    @handler
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on the cache file: reserve (mode 0, KEEP_SIZE), punch a hole or zero
        a range. The reservation counts against the cache and dirty bounds like a write of
        that many bytes (ENOSPC when there is no room), and the call is a change like a write:
        committed at the next flush, journaled and uploaded. Other modes: EOPNOTSUPP; so is
        a mode the cache's file system lacks."""
        self._check_writable()
        if mode not in FALLOCATE_MODES:
            raise FUSEError(errno.EOPNOTSUPP)
        of = self._of(fh)
        if of is None:
            raise FUSEError(errno.EBADF)
        reserve = 0 if mode & FALLOC_FL_PUNCH_HOLE else length
        if self.space is not None and reserve:
            await self.space.reserve_write(of, off, reserve)
        if not of.dirty:
            self.reg.mark_open_write(of.ino)
            of.dirty = True
        of.write_gen += 1
        of.written += reserve
        fallocate(of.fd, mode, off, length)

    @handler
    async def flush(self, fh: int) -> None:
        of = self._of(fh)
        if of is not None:
            self._commit_if_dirty(of)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        of = self._of(fh)
        if of is None:
            return
        await trio.to_thread.run_sync(os.fsync, of.fd, limiter=self.fsync_limiter)
        self._commit_if_dirty(of)
        await trio.to_thread.run_sync(self.reg.db.flush, limiter=self.fsync_limiter)

    @handler
    async def release(self, fh: int) -> None:
        entry = self.handles.pop(fh, None)
        if entry is None:
            if self.fetcher is not None and self.fetcher.owns(fh):
                ino = self.fetcher.release(fh)
                if ino is not None and not self.is_open(ino):
                    self._release_orphan(ino)
            return
        of, writing = entry
        self._commit_if_dirty(of)
        if writing:
            of.writers -= 1
        of.refs -= 1
        if of.refs > 0:
            return
        os.close(of.fd)
        if self.open_files.get(of.ino) is of:
            del self.open_files[of.ino]
        elif self.detached[of.ino] > 1:
            self.detached[of.ino] -= 1
        else:
            del self.detached[of.ino]
        if not self.is_open(of.ino):
            self._release_orphan(of.ino)

    def _release_orphan(self, ino: int) -> None:
        """The last handle on ``ino`` closed: an unlinked file's content may go now."""
        node = self.reg.get(ino)
        if node is not None and node.flags & F_ORPHAN and self.reg.release_orphan(ino):
            self._drop_content(ino)

    def _drop_content(self, ino: int) -> None:
        """An inode's content is gone for good: its file, and its place in the LRU order
        (which otherwise kept every inode ever created, deleted or not)."""
        # a .part file exists only while a download of the inode is registered (the fetcher
        # renames or removes it when the download ends, recovery after a crash)
        self.store.remove(ino, part=self.fetcher is not None and ino in self.fetcher.downloads)
        if self.space is not None:
            self.space.forget(ino)

    # ------------------------------------------------------------ directories

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not stat.S_ISDIR(node.mode):
            raise FUSEError(errno.ENOTDIR)
        fh = next(self._dir_fhs)
        self.open_dirs[fh] = (inode, [])
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # start_id is "how many entries of the listing were returned". The listing is taken
        # at the start (offset 0: opendir or rewinddir) and kept with the handle, so removing
        # entries while reading (rm -r) does not shift the rest: every entry present
        # throughout is returned exactly once, as POSIX asks. It starts with "." and ".."
        # (tools such as find -noleaf and pjdfstest count on them; root's ".." is root).
        d = self.open_dirs.get(fh)
        if d is None:
            raise FUSEError(errno.EBADF)
        inode, entries = d
        if start_id == 0:
            parent = self._node(inode).parent if inode != ROOT_INO else ROOT_INO
            entries = [(b".", inode), (b"..", parent)]
            entries += self.reg.list_dir(inode)
            self.open_dirs[fh] = (inode, entries)
        with self.reg.db.begin() as txn:  # one read transaction for the whole reply
            for i in range(start_id, len(entries)):
                name, ino = entries[i]
                if i < 2:  # "." and "..": the kernel makes no dentry of them
                    dot = self.reg.get_txn(txn, ino)
                    if dot is None:
                        continue
                    if not pyfuse3.readdir_reply(token, name, self._attrs(dot), i + 1):
                        break
                    continue
                node = self.reg.lookup_txn(txn, inode, name)
                if node is None:
                    continue  # removed since the listing was taken
                if not pyfuse3.readdir_reply(token, name, self._attrs(node), i + 1):
                    break

    @handler
    async def releasedir(self, fh: int) -> None:
        self.open_dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.reg.db.flush, limiter=self.fsync_limiter)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store.root)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        used = (self.reg.counter(b"files") + self.reg.counter(b"dirs")
                + self.reg.counter(b"symlinks"))
        s.f_files = used + st.f_ffree
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------ xattrs

    def _xattr_check(self, name: bytes) -> None:
        if not self.xattrs:
            # ENOSYS makes the kernel stop asking for the rest of the mount's life, which
            # removes a security.capability round trip from every write(2).
            raise FUSEError(errno.ENOSYS)
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENOTSUP)

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        self._xattr_check(name)
        if name.startswith(b"user.mirrorfs."):
            raise FUSEError(errno.EPERM)
        self.reg.setxattr(inode, name, value)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.xattrs:
            raise FUSEError(errno.ENOSYS)
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENODATA)
        if name.startswith(b"user.mirrorfs."):
            value = self.virtual_xattr(inode, name)
        else:
            value = self.reg.getxattr(inode, name)
        if value is None:
            raise FUSEError(errno.ENODATA)
        return value

    def virtual_xattr(self, inode: int, name: bytes) -> bytes | None:
        """``user.mirrorfs.*``: state and URLs, computed (replaced by the mount wiring)."""
        return None

    def virtual_xattr_names(self, inode: int) -> list[bytes]:
        return []

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self.xattrs:
            raise FUSEError(errno.ENOSYS)
        self._node(inode)
        return self.reg.listxattr(inode) + self.virtual_xattr_names(inode)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        self._xattr_check(name)
        self.reg.removexattr(inode, name)

    # ------------------------------------------------------------ lifecycle

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    def init(self) -> None:
        return None

    def close_all(self) -> None:
        """Unmount: commit what handles still hold (the kernel may not send release)."""
        files = {id(of): of for of in self.open_files.values()}
        files.update((id(of), of) for of, _writing in self.handles.values())  # and detached
        for of in files.values():
            try:
                if self.open_files.get(of.ino) is of:
                    self._commit_if_dirty(of)
                os.close(of.fd)
            except Exception:
                log.exception("committing inode %d at unmount", of.ino)
        inos = {of.ino for of in files.values()}
        if self.fetcher is not None:  # and handles streaming remote-only files
            inos.update(dl.ino for dl in self.fetcher.handles.values())
        orphans = [ino for ino in inos
                   if (node := self.reg.get(ino)) is not None and node.flags & F_ORPHAN]
        self.open_files.clear()
        self.handles.clear()
        self.detached.clear()
        for ino in orphans:  # unlinked while open: their last close is now
            if self.reg.release_orphan(ino):
                self.store.remove(ino)

