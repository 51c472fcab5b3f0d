"""A local (or NFS, or USB) directory as a mirror.

Owns nothing but the files under its base directory. Every path is resolved one component at a
time with ``O_NOFOLLOW`` relative to a descriptor of the base, so neither a hostile key nor a
symlink planted in the mirror can make us read or write outside it. Whole-file work runs in
worker threads behind one CapacityLimiter per instance; a mirror on a slow network disk then
stalls only its own uploads.

The key helpers at the top (:func:`split_key`, :func:`subtree_may_match`, :func:`quote_key`) are
shared with the FTP remote, the other mirror whose keys are directory paths.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import trio
import xxhash

from mirrorfs.config import mirror_defaults
from mirrorfs.errors import (
    InvalidKey,
    NotFound,
    PermanentRemoteError,
    RemoteError,
    RemoteUnavailable,
)
from mirrorfs.remotes.base import (
    PROBE_PREFIX,
    TMP_PREFIX,
    ListPage,
    ObjectMeta,
    PutResult,
    ReadStream,
    Remote,
    RemoteStat,
    listing_order,
    quote_key,
    retry,
    split_key,
    stale_temp,
    subtree_may_match,
    tmp_name,
)

log = logging.getLogger(__name__)

#: The xattr that carries ObjectMeta as JSON.
XATTR_NAME = "user.mirrorfs"

#: Bytes per read() of a ReadStream and per block copied by put().
BLOCK_SIZE = 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

T = TypeVar("T")


def _oserror(exc: OSError, what: str) -> Exception:
    """Turn a local OSError into the domain error the retry decorator understands."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return NotFound(what)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENAMETOOLONG):
        return PermanentRemoteError(f"{what}: {exc.strerror}")
    return RemoteError(f"{what}: {exc.strerror or exc}")


class _DirReadStream(ReadStream):
    """A range of one file, read in worker threads; the descriptor is opened on first use."""

    def __init__(self, remote: DirRemote, key: str, start: int, length: int | None) -> None:
        self._remote = remote
        self._key = key
        self._pos = start
        self._left = length
        self._fd: int | None = None

    async def __aenter__(self) -> ReadStream:
        await self._open()
        return self

    async def _open(self) -> int:
        if self._fd is None:
            self._fd = await self._remote._run(self._remote._open_file, self._key)
        return self._fd

    async def read(self) -> bytes:
        fd = await self._open()
        n = BLOCK_SIZE if self._left is None else min(BLOCK_SIZE, self._left)
        if n <= 0:
            return b""
        data = await self._remote._run(os.pread, fd, n, self._pos)
        self._pos += len(data)
        if self._left is not None:
            self._left -= len(data)
        return data

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DirRemote(Remote):
    """Mirror into a directory tree: one plain file per key, replaced atomically."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        options = {**mirror_defaults("dir"), **options}
        self.name = name
        self.base = os.path.abspath(options["path"])
        self.url_base: str | None = options.get("url_base")
        self._limiter = trio.CapacityLimiter(options["concurrency"])
        # Held (in threads) while a directory is created and filled, and while empty ones are
        # pruned, so that a delete never removes the directory a concurrent put is entering.
        self._tree_lock = threading.Lock()
        self._xattr_ok = True

    # -- plumbing --------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file work in this mirror's threads, with OSError turned into domain errors.

        Errors are translated by the caller-specific helpers below; anything left is mapped here.
        """
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise _oserror(exc, f"{self.name}: {getattr(fn, '__name__', fn)}") from exc

    def _open_base(self) -> int:
        try:
            return os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            # Not NotFound: a missing base is an unplugged disk or an unmounted share, not a
            # missing object, and must be retried rather than believed.
            raise RemoteUnavailable(
                f"mirror {self.name}: base directory {self.base}: {exc.strerror}") from exc

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """Descriptor of the directory ``parts`` below the base, never following a symlink."""
        fd = self._open_base()
        try:
            for part in parts:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as exc:
            os.close(fd)
            if create and exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PermanentRemoteError(
                    f"mirror {self.name}: a component of {'/'.join(parts)!r} is a symlink or a "
                    "file; refusing to follow it") from exc
            raise
        return fd

    def _open_file(self, key: str) -> int:
        """Open the regular file at ``key`` for reading (NotFound for anything else)."""
        parts = split_key(key)
        try:
            dfd = self._open_dir(parts[:-1], create=False)
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise _oserror(exc, f"{self.name}: {key}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(f"{self.name}: {key} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def _write_meta(self, fd: int, meta: ObjectMeta) -> None:
        """Apply mode and mtime, and keep the full ObjectMeta in an xattr where allowed."""
        if meta.mode is not None:
            os.fchmod(fd, meta.mode & 0o777)
        if self._xattr_ok:
            try:
                os.setxattr(fd, XATTR_NAME, json.dumps(meta.as_dict()).encode())
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.E2BIG,
                                     errno.ENOSPC, errno.EACCES):
                    raise
                log.info("mirror %s: no user xattrs on %s (%s); metadata is not kept",
                         self.name, self.base, exc.strerror)
                self._xattr_ok = False
        if meta.mtime_ns is not None:
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    def _read_meta(self, fd: int, size: int) -> ObjectMeta | None:
        try:
            raw = os.getxattr(fd, XATTR_NAME)
        except OSError:
            return None
        try:
            d = json.loads(raw)
        except ValueError:
            return None
        return ObjectMeta.from_dict(d, size) if isinstance(d, dict) else None

    def _prune(self, parts: list[str]) -> None:
        """Remove now-empty directories above a removed file, deepest first, up to the base."""
        with self._tree_lock:
            for depth in range(len(parts) - 1, 0, -1):
                try:
                    pfd = self._open_dir(parts[:depth - 1], create=False)
                except (OSError, RemoteError):
                    return
                try:
                    os.rmdir(parts[depth - 1], dir_fd=pfd)
                except OSError:
                    return
                finally:
                    os.close(pfd)

    # -- the Remote interface --------------------------------------------------------------

    def check_key(self, key: str) -> None:
        split_key(key)

    @retry()
    async def put(self, key: str, local_path: str, meta: ObjectMeta) -> PutResult:
        parts = split_key(key)
        # Opened outside _run so that a vanished local file stays an OSError, not NotFound.
        src = await trio.to_thread.run_sync(os.open, local_path,
                                            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                            limiter=self._limiter)
        try:
            return await self._run(self._put_sync, parts, src, meta)
        finally:
            os.close(src)

    def _put_sync(self, parts: list[str], src: int, meta: ObjectMeta) -> PutResult:
        tmp = tmp_name()
        with self._tree_lock:
            dfd = self._open_dir(parts[:-1], create=True)
            try:
                tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o666, dir_fd=dfd)
            except BaseException:
                os.close(dfd)
                raise
        try:
            try:
                h = xxhash.xxh3_128()
                size = 0
                while data := os.read(src, BLOCK_SIZE):
                    h.update(data)
                    size += len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(tfd, view):]
                digest = h.hexdigest()
                self._write_meta(tfd, replace(meta, size=size, xxhash=digest))
                os.fsync(tfd)
            finally:
                os.close(tfd)
            os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        finally:
            os.close(dfd)
        return PutResult(size=size, xxhash=digest)


    def open_read(self, key: str, start: int = 0, length: int | None = None) -> ReadStream:
        split_key(key)
        return _DirReadStream(self, key, start, length)

    @retry()
    async def delete(self, key: str) -> None:
        parts = split_key(key)
        await self._run(self._delete_sync, parts)

    def _delete_sync(self, parts: list[str]) -> None:
        try:
            dfd = self._open_dir(parts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            os.unlink(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            return
        finally:
            os.close(dfd)
        self._prune(parts)

    @retry()
    async def rename(self, src: str, dst: str, size: int | None = None) -> None:
        sparts, dparts = split_key(src), split_key(dst)
        if sparts != dparts:
            await self._run(self._rename_sync, sparts, dparts)

    def _rename_sync(self, sparts: list[str], dparts: list[str]) -> None:
        try:
            sfd = self._open_dir(sparts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"{self.name}: {'/'.join(sparts)}") from exc
        try:
            st = os.stat(sparts[-1], dir_fd=sfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"{self.name}: {'/'.join(sparts)} is not a regular file")
            with self._tree_lock:
                dfd = self._open_dir(dparts[:-1], create=True)
                try:
                    os.replace(sparts[-1], dparts[-1], src_dir_fd=sfd, dst_dir_fd=dfd)
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            os.fsync(sfd)
        finally:
            os.close(sfd)
        self._prune(sparts)

    @retry()
    async def list(self, prefix: str = "", cursor: str | None = None,
                   limit: int = 1000) -> ListPage:
        return await self._run(self._list_sync, prefix, cursor, limit)

    def _list_sync(self, prefix: str, cursor: str | None, limit: int) -> ListPage:
        page = ListPage()
        start = prefix.rpartition("/")[0]
        try:
            fd = self._open_dir(split_key(start) if start else [], create=False)
        except (FileNotFoundError, NotADirectoryError, InvalidKey):
            return page
        with contextlib.closing(self._walk(fd, start + "/" if start else "", prefix,
                                           cursor)) as walk:
            for entry in walk:
                page.entries.append(entry)
                if len(page.entries) >= limit:
                    page.cursor = entry.key
                    break
        return page

    def _walk(self, fd: int, dir_key: str, prefix: str,
              cursor: str | None) -> Generator[RemoteStat, None, None]:
        """Yield the files below ``fd`` in key order, skipping subtrees the page cannot want."""
        try:
            with os.scandir(fd) as it:
                entries = sorted(
                    ((listing_order(e.name, e.is_dir(follow_symlinks=False)), e) for e in it),
                    key=lambda pair: pair[0])
            for order, entry in entries:
                key = dir_key + order
                if entry.name.startswith(TMP_PREFIX):
                    continue
                if order.endswith("/"):
                    if not subtree_may_match(key, prefix, cursor):
                        continue
                    try:
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    yield from self._walk(sub, key, prefix, cursor)
                elif entry.is_file(follow_symlinks=False):
                    if not key.startswith(prefix) or (cursor is not None and key <= cursor):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    yield RemoteStat(key=key, size=st.st_size, mtime_ns=st.st_mtime_ns)
        finally:
            os.close(fd)

    @retry()
    async def stat(self, key: str) -> RemoteStat:
        split_key(key)
        return await self._run(self._stat_sync, key)

    def _stat_sync(self, key: str) -> RemoteStat:
        fd = self._open_file(key)
        try:
            st = os.fstat(fd)
            return RemoteStat(key=key, size=st.st_size, mtime_ns=st.st_mtime_ns,
                              meta=self._read_meta(fd, st.st_size))
        finally:
            os.close(fd)

    @retry()
    async def update_meta(self, key: str, meta: ObjectMeta) -> None:
        split_key(key)
        await self._run(self._update_meta_sync, key, meta)

    def _update_meta_sync(self, key: str, meta: ObjectMeta) -> None:
        fd = self._open_file(key)
        try:
            self._write_meta(fd, meta)
        finally:
            os.close(fd)

    @property
    def keeps_meta(self) -> bool:  # type: ignore[override]
        return self._xattr_ok

    keeps_mtime = True

    async def clean_temps(self, cutoff: float, dirs: Sequence[str] | None = None) -> int:
        return await self._run(self._clean_temps_sync, cutoff, dirs)

    def _clean_temps_sync(self, cutoff: float, dirs: Sequence[str] | None) -> int:
        """Look for stale temp files by descriptors (never following a symlink): in
        ``dirs``, or in the whole tree."""
        n = 0
        base = self._open_base()
        os.close(base)
        if dirs is None:
            for _dir, _subdirs, files, dfd in os.fwalk(self.base, follow_symlinks=False):
                n += self._clean_dir(dfd, files, cutoff)
            return n
        for d in dirs:
            try:
                dfd = self._open_dir(split_key(d) if d else [], create=False)
            except (OSError, InvalidKey, RemoteError):
                continue
            try:
                n += self._clean_dir(dfd, os.listdir(dfd), cutoff)
            finally:
                os.close(dfd)
        return n

    @staticmethod
    def _clean_dir(dfd: int, names: Sequence[str], cutoff: float) -> int:
        n = 0
        for name in names:
            if not name.startswith(TMP_PREFIX):
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and stale_temp(name, st.st_mtime, cutoff):
                    os.unlink(name, dir_fd=dfd)
                    n += 1
            except FileNotFoundError:
                continue
        return n

    async def probe(self) -> None:
        """Round-trip a small file at the top of the base, the way put and read would."""
        key = PROBE_PREFIX + secrets.token_hex(8)
        payload = secrets.token_bytes(64)
        await self._run(self._probe_sync, key, payload)

    def _probe_sync(self, key: str, payload: bytes) -> None:
        dfd = self._open_base()
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dfd)
            try:
                os.write(fd, payload)
                os.fsync(fd)
                back = os.pread(fd, len(payload) + 1, 0)
            finally:
                os.close(fd)
                os.unlink(key, dir_fd=dfd)
        finally:
            os.close(dfd)
        if back != payload:
            raise RemoteError(f"mirror {self.name}: probe file read back differently")

    def url(self, key: str) -> str | None:
        return quote_key(self.url_base, key)
