"""The one interface every mirror implements, and the retry decorator they share.

The rest of mirrorfs never knows which protocol it talks to: the uploader calls ``put``,
``delete``, ``rename``; the read path calls ``open_read``; the admin tool calls ``list`` and
``stat``. Keys are paths relative to the mirror's base (no leading slash), as ``str`` decoded
with ``os.fsdecode`` (so non-UTF-8 names arrive as surrogate escapes; a remote that cannot store
them raises :class:`InvalidKey` from :meth:`Remote.check_key`).

All methods are trio coroutines. Blocking clients (boto3) run in ``trio.to_thread.run_sync``
with a per-mirror CapacityLimiter; asyncio clients (aioftp) run on their own loop in one thread.
"""

from __future__ import annotations

import abc
import functools
import logging
import os
import random
import secrets
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import trio

from mirrorfs.errors import InvalidKey, PermanentRemoteError, RemoteError, RemoteUnavailable
from mirrorfs.names import PROBE_PREFIX as PROBE_PREFIX  # (re-exported: the remotes use it)
from mirrorfs.names import TMP_PREFIX

log = logging.getLogger(__name__)

#: Size of the chunks whose xxhash is recorded at upload; reads are verified per chunk.
CHUNK_SIZE = 4 * 1024 * 1024
#: largest object size believed from a mirror (above S3's 5 TiB object limit): a listing or a
#: change-log record with more is hostile or broken
MAX_FILE_SIZE = 1 << 43

#: Object metadata names (S3 user metadata keys; other remotes may keep them elsewhere).
META_HASH = "mirrorfs-xxh3"
META_SIZE = "mirrorfs-size"
META_MTIME = "mirrorfs-mtime-ns"
META_MODE = "mirrorfs-mode"
#: The registry that wrote the object (``Database.registry_id``): an object that carries our
#: id and that no record owns is a stray of ours; anything else is foreign (another node's,
#: someone else's, or from before the registry was made) and never deleted by an audit.
META_WRITER = "mirrorfs-writer"


@dataclass(frozen=True)
class ObjectMeta:
    """What we store next to an object so that it can be verified and re-imported."""

    size: int
    xxhash: str | None = None  # hex xxh3_128 of the whole content
    mtime_ns: int | None = None
    mode: int | None = None
    writer: str | None = None

    def as_dict(self) -> dict[str, str]:
        d = {META_SIZE: str(self.size)}
        if self.writer is not None:
            d[META_WRITER] = self.writer
        if self.xxhash is not None:
            d[META_HASH] = self.xxhash
        if self.mtime_ns is not None:
            d[META_MTIME] = str(self.mtime_ns)
        if self.mode is not None:
            d[META_MODE] = "%o" % self.mode
        return d

    @classmethod
    def from_dict(cls, d: dict[str, str], size: int) -> ObjectMeta:
        """Parse metadata a mirror sent (untrusted): a value that is malformed or out of
        range is dropped, as if absent, rather than believed or allowed to raise later."""
        def _int(name: str, lo: int, hi: int, base: int = 10) -> int | None:
            try:
                v = int(str(d[name])[:40], base)
            except (KeyError, ValueError):
                return None
            return v if lo <= v <= hi else None

        digest = d.get(META_HASH)
        if not isinstance(digest, str) or len(digest) != 32 or \
                not all(c in "0123456789abcdef" for c in digest):
            digest = None
        return cls(
            size=size,
            xxhash=digest,
            mtime_ns=_int(META_MTIME, -(1 << 63), (1 << 63) - 1),
            mode=_int(META_MODE, 0, 0o7777, 8),
            writer=d.get(META_WRITER),
        )


@dataclass(frozen=True)
class RemoteStat:
    """One object as the mirror reports it."""

    key: str
    size: int
    mtime_ns: int | None = None  # the remote's own LastModified (not the file's mtime)
    etag: str | None = None
    meta: ObjectMeta | None = None  # our metadata, if the object carries it


@dataclass(frozen=True)
class PutResult:
    """What was actually sent: the hash is computed on the way, from the bytes read."""

    size: int
    xxhash: str
    etag: str | None = None


@dataclass
class ListPage:
    entries: list[RemoteStat] = field(default_factory=list)
    cursor: str | None = None  # None: listing complete


class ReadStream(abc.ABC):
    """A byte range being downloaded. Use as ``async with``; ``read()`` returns b"" at the end."""

    _spill: memoryview | None = None  # what read() returned beyond the last readinto()

    @abc.abstractmethod
    async def read(self) -> bytes: ...

    async def readinto(self, buf: memoryview) -> int:
        """Fill ``buf``; fewer bytes only at the end of the range. This default goes through
        read(); a remote that can receive straight into ``buf`` saves a copy per byte."""
        n = 0
        while n < len(buf):
            if not self._spill:
                data = await self.read()
                if not data:
                    break
                self._spill = memoryview(data)
            k = min(len(self._spill), len(buf) - n)
            buf[n:n + k] = self._spill[:k]
            self._spill = self._spill[k:]
            n += k
        return n

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> ReadStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


class Remote(abc.ABC):
    """A mirror. Implementations: ``s3``, ``ftp``, ``dir`` (see ``remotes/__init__.py``)."""

    #: the mirror's name from the config
    name: str

    @abc.abstractmethod
    def __init__(self, name: str, options: dict[str, Any]) -> None:
        """``options``: the mirror's validated config section (plain values, sizes in bytes)."""

    def __repr__(self) -> str:
        # a remote holds credentials (password, secret key): its repr names it, nothing more
        return f"<{type(self).__name__} {getattr(self, 'name', '?')}>"

    @abc.abstractmethod
    def check_key(self, key: str) -> None:
        """Raise InvalidKey if this mirror cannot store ``key``. Pure, no I/O."""

    @abc.abstractmethod
    async def put(self, key: str, local_path: str, meta: ObjectMeta) -> PutResult:
        """Upload the file at ``local_path`` under ``key``, atomically (never half-visible).

        Streams from disk with bounded memory and hashes what it sends (xxh3_128 hex).
        ``meta.xxhash`` is what the caller computed beforehand; if the bytes sent differ the
        caller sees it in ``PutResult.xxhash`` and must not record the upload as done.
        """

    #: Jobs the uploader may run on this mirror beyond its ``concurrency``, for a remote
    #: that bounds its own requests (S3: its thread limiter): while that many requests are
    #: in flight, the extra jobs read, hash and record, so that no request slot waits for
    #: the local work between two files.
    jobs_ahead: int = 0

    #: Content up to this many bytes may be handed to :meth:`put_data` in memory, read once
    #: for hashing and sending (0: this mirror always uploads from the file).
    inline_put_limit: int = 0

    async def put_data(self, key: str, data: bytes, meta: ObjectMeta) -> PutResult:
        """Upload ``data`` under ``key`` as :meth:`put` would the same bytes from a file.
        ``meta.xxhash`` is the hash of ``data`` (the caller computed it from these bytes)."""
        raise NotImplementedError(f"{type(self).__name__} uploads from files only")

    @abc.abstractmethod
    def open_read(self, key: str, start: int = 0, length: int | None = None) -> ReadStream:
        """Stream ``length`` bytes (to the end if None) of ``key`` from ``start``.

        Raises NotFound (from the first ``read()`` or from ``__aenter__``) if the key is missing.
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error (deletes are replayed)."""

    @abc.abstractmethod
    async def rename(self, src: str, dst: str, size: int | None = None) -> None:
        """Move ``src`` to ``dst`` on the server, replacing ``dst``. NotFound if src is gone.

        ``size``: the object's size if the caller knows it (lets S3 skip a HEAD request)."""

    #: whether :meth:`copy` copies on the server (else the uploader uploads the file again)
    server_copy: bool = False

    async def copy(self, src: str, dst: str, size: int | None = None) -> None:
        """Copy ``src`` to ``dst`` on the server, replacing ``dst``, metadata included.
        NotFound if src is gone. Only where :attr:`server_copy` says so (hard links: every
        path of an inode is an object of its own)."""
        raise NotImplementedError(f"{type(self).__name__} has no server-side copy")

    @abc.abstractmethod
    async def list(self, prefix: str = "", cursor: str | None = None,
                   limit: int = 1000) -> ListPage:
        """One page of objects under ``prefix`` (recursive), in key order, resumable."""

    @abc.abstractmethod
    async def stat(self, key: str) -> RemoteStat:
        """The object's size and metadata; NotFound if missing."""

    async def update_meta(self, key: str, meta: ObjectMeta) -> None:  # noqa: B027
        """Replace the stored metadata (chmod, utime). Remotes without metadata do nothing."""

    @abc.abstractmethod
    async def probe(self) -> None:
        """Write, read back and delete a small object; raise RemoteError if that fails."""

    async def aclose(self) -> None:  # noqa: B027
        """Release connections and threads."""

    #: Whether every object we write carries our ObjectMeta (so that one without it, or
    #: with another hash, at a key we own was changed behind our back).
    keeps_meta: bool = False
    #: Whether an object's listed mtime is the file's mtime we set (``ObjectMeta.mtime_ns``)
    #: rather than the time it was written: a listed mtime that differs from the recorded
    #: one is then a change behind our back.
    keeps_mtime: bool = False

    async def clean_temps(self, cutoff: float, dirs: Sequence[str] | None = None) -> int:
        """Remove what cut transfers left (temp files, incomplete multipart uploads) that
        this process did not start and that is older than ``cutoff`` (wall-clock seconds).
        ``dirs``: only in these directories (keys without the last component, "" for the
        top), else everywhere. Returns how many were removed. Remotes whose transfers leave
        nothing do nothing."""
        return 0

    def url(self, key: str) -> str | None:
        """Public URL of ``key`` if the config gives a URL base for this mirror."""
        return None


P = ParamSpec("P")
T = TypeVar("T")


def retry(
    attempts: int = 5, base_delay: float = 0.2, max_delay: float = 10.0
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Retry a remote coroutine on RemoteError with exponential backoff and full jitter.

    The log level rises with the attempt number so that one blip stays quiet and a mirror
    that keeps failing is visible. Permanent errors, NotFound and RemoteUnavailable pass
    straight through.
    """

    def deco(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            for attempt in range(1, attempts + 1):
                try:
                    return await fn(*args, **kwargs)
                except (PermanentRemoteError, RemoteUnavailable):
                    # Unavailable goes straight up: the uploader marks the mirror down and
                    # probes it, the reader tries the next mirror. Retrying here only hides it.
                    raise
                except RemoteError as exc:
                    if attempt == attempts:
                        raise
                    delay = random.uniform(0, min(max_delay, base_delay * 2 ** attempt))
                    level = logging.DEBUG if attempt == 1 else (
                        logging.INFO if attempt < 3 else logging.WARNING)
                    log.log(level, "%s failed (attempt %d/%d): %s; retrying in %.2fs",
                            fn.__qualname__, attempt, attempts, exc, delay)
                    await trio.sleep(delay)
            raise AssertionError("unreachable")

        return wrapper

    return deco


def make_remote(name: str, kind: str, options: dict[str, Any]) -> Remote:
    """Build a remote from its config section (prefix map in ``remotes/__init__.py``)."""
    from mirrorfs.remotes import KINDS, remote_class

    if kind not in KINDS:
        raise PermanentRemoteError(f"unknown mirror type {kind!r}")
    return remote_class(kind)(name, options)


# Keys of path-based mirrors (dir, FTP) and of S3, shared by the remotes.

#: This process's mark in the names of its temp files (``tmp_name``): a temp file without
#: it belongs to a transfer of another process, over since a crash, or of another node.
PROCESS_TOKEN = secrets.token_hex(4)


def tmp_name() -> str:
    return f"{TMP_PREFIX}{PROCESS_TOKEN}-{secrets.token_hex(8)}"


def stale_temp(name: str, mtime: float | None, cutoff: float) -> bool:
    """Whether a temp file ``name`` is the remains of a cut transfer to be removed."""
    return (name.startswith(TMP_PREFIX) and not name.startswith(TMP_PREFIX + PROCESS_TOKEN)
            and (mtime is None or mtime < cutoff))


def split_key(key: str) -> list[str]:
    """Split a relative key into path components, refusing anything that could leave the base.

    Keys come from filenames, but a damaged journal or a bug upstream must not turn into a write
    to ``/etc``: absolute keys, ``..``, empty components and NUL are refused here, once, for
    every path-based mirror.
    """
    if not key:
        raise InvalidKey("empty key")
    if "\0" in key:
        raise InvalidKey(f"key {key!r} contains a NUL byte")
    if key.startswith("/"):
        raise InvalidKey(f"key {key!r} is absolute; keys are relative to the mirror's base")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidKey(f"key {key!r} has an empty, '.' or '..' path component")
        if part.startswith(TMP_PREFIX):
            raise InvalidKey(f"key {key!r} uses the reserved prefix {TMP_PREFIX!r}")
    return parts


def subtree_may_match(dir_key: str, prefix: str, cursor: str | None) -> bool:
    """Whether a directory (``dir_key`` ends with "/") can hold keys a list page still wants.

    Every key below the directory starts with ``dir_key``; if that string is before the cursor
    and the cursor is not itself inside the directory, every key below is before it too.
    """
    if not (dir_key.startswith(prefix) or prefix.startswith(dir_key)):
        return False
    return cursor is None or cursor.startswith(dir_key) or dir_key > cursor


def listing_order(name: str, is_dir: bool) -> str:
    """Sort key for one directory's entries that makes a depth-first walk yield keys in order.

    A directory sorts as ``name + "/"`` because that is what all of its keys start with; a file
    name has no "/", so it can never fall between two keys of the same directory.
    """
    return name + "/" if is_dir else name


def quote_key(url_base: str | None, key: str) -> str | None:
    """URL of ``key`` under ``url_base`` (bytes of non-UTF-8 names are percent-encoded raw)."""
    if not url_base:
        return None
    return url_base.rstrip("/") + "/" + urllib.parse.quote(os.fsencode(key), safe="/")
