"""Downloads of remote-only files: streamed, shared between readers, verified per chunk.

Owns the downloads in progress and the handles open on remote-only files.

A download fills ``data/<ino>.part`` (sparse, full size) from one streaming GET that starts at
the first missing chunk. Each CHUNK_SIZE piece is checked against the xxh3_64 recorded when the
file was uploaded before it is written and marked verified; a read is answered as soon as the
chunks it covers are verified, so the first bytes of a large file are served long before the
end arrives. A read far ahead of the stream gets a ranged request of its own. A chunk that does
not match is retried once, then fetched from the next mirror; if no mirror has good bytes the
read fails with EIO (:class:`NoGoodCopy`) and the log says which mirror served what. A
failure of the local disk while storing the bytes (ENOSPC, EIO) is not the mirrors' fault:
the download stops at once with :class:`LocalDiskError` (the disk's errno), logged as a
local disk problem, and no other mirror is tried.

Files with only a whole-file hash (imported objects) are not streamed: readers wait until the
whole download matched that hash (counted as ``whole_hash_downloads``). An object with no hash
at all (a foreign bucket without our metadata) is trusted on first use by size only, counted as
``unverified_downloads``, and its hashes are recorded from then on.

When every chunk is verified the file is fsync'd and renamed into place, and the inode becomes
local in LMDB: a crash at any point leaves either a ``.part`` file (discarded at startup) or a
complete verified file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
import xxhash

from mirrorfs.cache.content import mark_downloaded
from mirrorfs.cache.db import F_ORPHAN, LOCAL_FULL, U64, Inode, RemoteCopy
from mirrorfs.errors import (
    IntegrityError,
    LocalDiskError,
    MirrorfsError,
    NoGoodCopy,
    NotFound,
    RemoteError,
    RemoteUnavailable,
)
from mirrorfs.hashing import chunk_digest
from mirrorfs.remotes.base import CHUNK_SIZE, ReadStream, Remote

if TYPE_CHECKING:
    from mirrorfs.cache.registry import Registry
    from mirrorfs.cache.store import Store
    from mirrorfs.pagecache import PageDropper
    from mirrorfs.space import Space
    from mirrorfs.stats import RuntimeStats

log = logging.getLogger(__name__)

#: a read this many chunks ahead of the stream gets a ranged request of its own
AHEAD_CHUNKS = 4
#: attempts per mirror for a chunk whose hash does not match
ATTEMPTS_PER_MIRROR = 2
#: a missing object is looked up again this many times, this many seconds apart (it may be
#: moving: see Fetcher._moved_key)
MOVE_WAITS, MOVE_WAIT = 4, 0.5
FH_BASE = 1 << 48
#: chunks received and hashed ahead of their check
PIPELINE_CHUNKS = 2
#: verified chunks kept in memory per download (CHUNK_SIZE each) for readers near the front
RING_CHUNKS = 8
#: verified chunks waiting for the cache-file writer (beyond them the stream waits)
WRITE_QUEUE = 4
#: O_DIRECT alignment for lengths (offsets are multiples of CHUNK_SIZE)
DIRECT_ALIGN = 4096
#: a reader that has not read for this long (seconds) no longer holds the stream back
READER_IDLE = 0.25
#: the kernel's cached pages of a streamed file are dropped this far behind its slowest
#: reader, this much at a time (see Fetcher._drop_behind)
DROP_LAG, DROP_STEP = 8 << 20, 32 << 20


@dataclass
class Source:
    name: str
    remote: Remote
    key: str
    copy: RemoteCopy


@dataclass
class Download:
    ino: int
    ver: int
    size: int
    fd: int
    expected: list[bytes] | None  # per-chunk digests; None: whole-file hash only
    whole: bytes | None  # xxh3_128 digest expected for the whole file, if known
    sources: list[Source]
    verified: bytearray = field(default_factory=bytearray)
    failed: dict[int, str] = field(default_factory=dict)
    progress: trio.Event = field(default_factory=trio.Event)
    done: bool = False
    error: str | None = None
    local_error: LocalDiskError | None = None  # the error was our disk's, not a mirror's
    front: int = 0  # chunk the streaming GET is working on
    first_byte: float | None = None  # trio time the stream's first bytes arrived
    unwritten: set[int] = field(default_factory=set)  # verified, in the ring, not in the file
    #: the last verified chunks of the stream, in memory, for readers close behind it
    ring: dict[int, mmap.mmap] = field(default_factory=dict)
    pool: list[mmap.mmap] = field(default_factory=list)  # chunk buffers free for reuse
    ranged: set[int] = field(default_factory=set)
    handles: int = 0
    #: handle -> (chunk of its last read, trio time of that read): see Fetcher._pace
    readers: dict[int, tuple[int, float]] = field(default_factory=dict)
    reader_moved: trio.Event = field(default_factory=trio.Event)
    dropped_to: int = 0  # the kernel's pages of the file before this offset were dropped
    superseded: bool = False  # a newer version of the file started a download of its own
    scopes: list[trio.CancelScope] = field(default_factory=list)

    def cancel(self) -> None:
        for scope in self.scopes:
            scope.cancel()

    def failure(self) -> MirrorfsError:
        """What a reader of this failed download gets (through errors.to_errno)."""
        return self.local_error or NoGoodCopy(self.error or "no mirror has good bytes")

    @property
    def nchunks(self) -> int:
        return max(1, -(-self.size // CHUNK_SIZE))

    def chunk_len(self, i: int) -> int:
        return min(CHUNK_SIZE, self.size - i * CHUNK_SIZE) if self.size else 0

    def notify(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    def covered(self, off: int, size: int) -> bool:
        if self.done:
            return True
        if self.expected is None:
            return False
        first, last = off // CHUNK_SIZE, max(off, min(off + size, self.size) - 1) // CHUNK_SIZE
        return all(self.verified[i] for i in range(first, min(last, self.nchunks - 1) + 1))


class Fetcher:
    def __init__(self, reg: Registry, store: Store, remotes: dict[str, Remote],
                 read_order: list[str], stats: RuntimeStats, nursery: trio.Nursery,
                 is_up: Callable[[str], bool] = lambda name: True,
                 space: Space | None = None,
                 on_complete: Callable[[int], None] = lambda ino: None,
                 dropper: PageDropper | None = None) -> None:
        self.reg = reg
        self.store = store
        self.remotes = remotes
        self.read_order = read_order
        self.stats = stats
        self.nursery = nursery
        self.is_up = is_up
        self.space = space
        self.downloads: dict[int, Download] = {}
        #: fh -> the download it reads (a handle keeps its version's download even when a
        #: newer version of the file starts another one)
        self.handles: dict[int, Download] = {}
        self._next_fh = FH_BASE
        self.on_complete = on_complete
        #: drops the pages streamed readers left behind; None: keep them (direct I/O opens
        #: have none, and unmounted there is no kernel)
        self.dropper = dropper
        self._drop_limiter = trio.CapacityLimiter(1)
        #: threads per resource, so that one kind of work cannot starve another: the per-chunk
        #: check readers wait on, whole-file hashes (imported objects: long), and writes and
        #: fsyncs of download files to the cache disk
        self.chunk_hash_limiter = trio.CapacityLimiter(4)
        self.whole_hash_limiter = trio.CapacityLimiter(2)
        self.disk_limiter = trio.CapacityLimiter(8)

    # ------------------------------------------------------------ handles

    def owns(self, fh: int) -> bool:
        return fh in self.handles

    def open_remote(self, node: Inode) -> int:
        dl = self._start(node)
        dl.handles += 1
        self._next_fh += 1
        self.handles[self._next_fh] = dl
        return self._next_fh

    def release(self, fh: int) -> int | None:
        """Close a handle; returns the inode it was open on."""
        dl = self.handles.pop(fh, None)
        if dl is None:
            return None
        dl.handles -= 1
        if dl.readers.pop(fh, None) is not None:
            dl.reader_moved.set()
        self._maybe_forget(dl)
        return dl.ino

    def has_handles(self, ino: int) -> bool:
        return any(dl.ino == ino for dl in self.handles.values())

    def _maybe_forget(self, dl: Download) -> None:
        if dl.handles <= 0 and (dl.done or dl.error) and dl.fd >= 0:
            if self.downloads.get(dl.ino) is dl:
                del self.downloads[dl.ino]
            dl.ring.clear()
            dl.pool.clear()
            os.close(dl.fd)
            dl.fd = -1

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        dl = self.handles[fh]
        if off >= dl.size:
            return b""
        dl.readers[fh] = (off // CHUNK_SIZE, trio.current_time())
        dl.reader_moved.set()
        while not dl.covered(off, size):
            if dl.error:
                raise dl.failure()
            bad = [i for i in self._chunks(dl, off, size) if i in dl.failed]
            if bad:
                self.stats.bump("read_errors")
                raise dl.failure()
            self._maybe_ranged(dl, off)
            await dl.progress.wait()
        if self.dropper is not None and self.dropper.enabled:
            self._drop_behind(dl)
        return _read_range(dl, off, min(size, dl.size - off))

    def _drop_behind(self, dl: Download) -> None:
        """Drop the kernel's pages of the file DROP_LAG behind its slowest reader (see
        mirrorfs/pagecache.py for why). Their bytes are in the cache file: a reader that goes
        back gets them from there."""
        low = min(pos for pos, _t in dl.readers.values()) * CHUNK_SIZE - DROP_LAG
        if low - dl.dropped_to < DROP_STEP:
            return
        off, dl.dropped_to = dl.dropped_to, low
        dropper = self.dropper
        assert dropper is not None

        async def drop() -> None:
            await trio.to_thread.run_sync(dropper.drop, dl.ino, off, low - off,
                                          limiter=self._drop_limiter)

        self.nursery.start_soon(drop)

    def _chunks(self, dl: Download, off: int, size: int) -> range:
        last = min(off + size, dl.size) - 1
        return range(off // CHUNK_SIZE, last // CHUNK_SIZE + 1)

    async def fetch_all(self, node: Inode) -> None:
        """Bring the whole file into the cache (before a write, or for an upload elsewhere).

        If the file changes in place meanwhile (a pull), the newest version is fetched."""
        while True:
            dl = self._start(node)
            dl.handles += 1
            try:
                while not dl.done and not dl.superseded:
                    if dl.error or dl.failed:
                        raise dl.failure()
                    await dl.progress.wait()
            finally:
                dl.handles -= 1
                self._maybe_forget(dl)
            if dl.done:
                return
            cur = self.reg.get(node.ino)
            if cur is None or cur.local == LOCAL_FULL or cur.flags & F_ORPHAN:
                return  # deleted, or cached meanwhile: nothing left to fetch
            node = cur

    # ------------------------------------------------------------ downloads

    def _sources(self, node: Inode) -> list[Source]:
        names = list(self.read_order) + [n for n in self.remotes if n not in self.read_order]
        up = [n for n in names if self.is_up(n)] + [n for n in names if not self.is_up(n)]
        out = []
        with self.reg.db.begin() as txn:
            for name in up:
                idx = self._index(name)
                if idx is None:
                    continue
                rc = self.reg.remote_copy(txn, idx, node.ino)
                if rc is None or (rc.ver and rc.ver != node.ver):
                    continue
                out.append(Source(name, self.remotes[name], os.fsdecode(rc.path), rc))
        return out

    def _index(self, name: str) -> int | None:
        for m in self.reg.mirrors:
            if m.name == name:
                return m.index
        return None

    def _start(self, node: Inode) -> Download:
        dl = self.downloads.get(node.ino)
        if dl is not None and not dl.error:
            if dl.ver >= node.ver:
                return dl  # (a caller holding an older entry gets the current version)
            self._supersede(dl)
        elif node.local == LOCAL_FULL and dl is None:
            # a caller's bug: it should have used the local file
            raise MirrorfsError(f"inode {node.ino} is in the cache; nothing to download")
        sources = self._sources(node)
        if not sources:
            log.error("%r (inode %d) is not in the cache and no mirror holds version %d",
                      self.reg.path_of(node.ino), node.ino, node.ver)
            raise NoGoodCopy(f"inode {node.ino}: no mirror holds version {node.ver}")
        expected = None
        with self.reg.db.begin() as txn:
            v = txn.get(U64.pack(node.ino), db=self.reg.chunks)
        if v is not None and U64.unpack(v[:8])[0] == node.ver:
            raw = bytes(v[8:])
            expected = [raw[i:i + 8] for i in range(0, len(raw), 8)]
        whole = node.hash if node.hash_ver == node.ver and node.hash_ver else None
        if whole is None and sources[0].copy.hash.strip(b"\0"):
            whole = sources[0].copy.hash
        if self.space is not None:
            self.space.make_room(node.size)
            self.space.downloading += node.size
        fd = -1
        try:
            fd = os.open(self.store.part_path(node.ino),
                         os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            os.ftruncate(fd, node.size)  # sparse: no space taken yet
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if self.space is not None:
                self.space.downloading -= node.size
            err = LocalDiskError(exc, f"cannot create the download file of inode {node.ino}")
            log.error("local disk problem, not a mirror problem: %s", err)
            raise err from None
        dl = Download(node.ino, node.ver, node.size, fd, expected, whole, sources)
        dl.verified = bytearray(dl.nchunks)
        if expected is not None and len(expected) != dl.nchunks:
            dl.expected = None
        self.downloads[node.ino] = dl
        self.stats.bump("misses")
        self.stats.bump("downloads")
        self._spawn(dl, self._run_front)
        return dl

    def _supersede(self, dl: Download) -> None:
        """The file changed in place (a pull) while ``dl`` fetched its old version: stop
        it, and let the new version's download have the .part name. Handles open on the old
        version get EIO from now on rather than bytes of a version their size does not
        describe; its tasks write only to their own (now unlinked) file."""
        dl.error = f"version {dl.ver} was replaced while it downloaded"
        dl.superseded = True
        dl.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.store.part_path(dl.ino))
        del self.downloads[dl.ino]
        dl.notify()
        self._maybe_forget(dl)

    def _maybe_ranged(self, dl: Download, off: int) -> None:
        c = off // CHUNK_SIZE
        if (dl.expected is not None and c - dl.front >= AHEAD_CHUNKS and c not in dl.ranged
                and not dl.verified[c]):
            dl.ranged.add(c)
            self._spawn(dl, self._run_ranged, c)

    def _spawn(self, dl: Download, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a download task in the mount's nursery; it never takes the mount down."""

        async def guarded() -> None:
            scope = trio.CancelScope()
            dl.scopes.append(scope)
            try:
                with scope:
                    await fn(dl, *args)
            except Exception as exc:
                log.exception("download of inode %d failed", dl.ino)
                if fn == self._run_front:
                    dl.error = str(exc) or type(exc).__name__
            finally:
                dl.scopes.remove(scope)
                dl.notify()

        self.nursery.start_soon(guarded)

    async def _run_ranged(self, dl: Download, c: int) -> None:
        for src in dl.sources:
            for _ in range(ATTEMPTS_PER_MIRROR):
                try:
                    async with src.remote.open_read(src.key, c * CHUNK_SIZE,
                                                    dl.chunk_len(c)) as stream:
                        buf = bytearray()
                        while len(buf) < dl.chunk_len(c):
                            data = await stream.read()
                            if not data:
                                break
                            buf += data
                    if dl.verified[c]:
                        return
                    self._accept(dl, c, bytes(buf[:dl.chunk_len(c)]), src)
                    return
                except IntegrityError:
                    continue
                except (MirrorfsError, OSError) as exc:
                    log.info("ranged read of %s from %s failed: %s", src.key, src.name, exc)
                    break
        dl.ranged.discard(c)  # the stream will get there

    def _accept(self, dl: Download, c: int, piece: bytes, src: Source) -> None:
        """Verify one chunk and write it; raise IntegrityError if it does not match."""
        if len(piece) != dl.chunk_len(c):
            raise IntegrityError(f"short chunk {c} from {src.name}")
        if dl.expected is not None and chunk_digest(piece) != dl.expected[c]:
            self.stats.bump("verify_failures")
            log.warning("chunk %d of %s from mirror %s does not match its xxhash", c, src.key,
                        src.name)
            raise IntegrityError(f"chunk {c} from {src.name} does not match")
        os.pwrite(dl.fd, piece, c * CHUNK_SIZE)
        dl.verified[c] = 1
        self.stats.bump("download_bytes", len(piece))
        dl.notify()

    async def _run_front(self, dl: Download) -> None:
        t0 = trio.current_time()
        try:
            await self._stream_all(dl)
            if dl.done:
                took = trio.current_time() - t0
                first = (dl.first_byte or t0) - t0
                log.info("downloaded %s (inode %d, %d bytes) from %s in %.2f s, first bytes "
                         "after %.2f s (%.0f MB/s after them)", dl.sources[0].key, dl.ino,
                         dl.size, dl.sources[0].name, took, first,
                         dl.size / max(took - first, 1e-6) / 1e6)
        finally:
            if self.space is not None:
                self.space.downloading -= dl.size
            self._maybe_forget(dl)

    async def _stream_all(self, dl: Download) -> None:
        tried: list[str] = []
        for src in dl.sources:
            for _attempt in range(ATTEMPTS_PER_MIRROR):
                start = next((i for i in range(dl.nchunks) if not dl.verified[i]), None)
                if start is None or dl.size == 0:
                    try:
                        await self._finish(dl, src)
                    except LocalDiskError as exc:
                        self._local_failure(dl, exc)
                    return
                if dl.expected is None:
                    start = 0
                if dl.error:
                    return  # superseded (see _supersede): the .part name is not ours now
                try:
                    await self._stream_from(dl, src, start)
                except LocalDiskError as exc:
                    self._local_failure(dl, exc)
                    return
                except IntegrityError as exc:
                    tried.append(f"{src.name}: {exc}")
                    continue
                except NotFound as exc:
                    # A rename of the file may have reached the mirror after this download
                    # took the object's key: read on from where the registry says it is now.
                    key = await self._moved_key(dl, src)
                    if key is not None:
                        log.info("download of %s from %s: the object moved to %s", src.key,
                                 src.name, key)
                        src.key = key
                        continue
                    tried.append(f"{src.name}: {exc}")
                    log.info("download of %s from %s failed: %s", src.key, src.name, exc)
                    break
                except (MirrorfsError, OSError) as exc:
                    tried.append(f"{src.name}: {exc}")
                    log.info("download of %s from %s failed: %s", src.key, src.name, exc)
                    if isinstance(exc, RemoteError) and not isinstance(exc, RemoteUnavailable):
                        continue  # a stream broken mid-way: resume at the first missing chunk
                    break
                if all(dl.verified):
                    try:
                        if await self._finish(dl, src):
                            return
                    except LocalDiskError as exc:
                        self._local_failure(dl, exc)
                        return
                    tried.append(f"{src.name}: whole-file hash mismatch")
                    dl.verified = bytearray(dl.nchunks)
                    dl.ring.clear()
        missing = [i for i in range(dl.nchunks) if not dl.verified[i]]
        for i in missing:
            dl.failed[i] = "; ".join(tried)
        dl.error = "; ".join(tried) or "no mirror"
        log.error("no mirror has good bytes for %s (inode %d, chunks %s...): %s",
                  dl.sources[0].key, dl.ino, missing[:4], dl.error)

    def _local_failure(self, dl: Download, exc: LocalDiskError) -> None:
        """Our disk refused the bytes: the download fails now, with the disk's errno; the
        mirrors are not blamed and no other one is tried."""
        dl.local_error = exc
        dl.error = str(exc)
        for i in range(dl.nchunks):
            if not dl.verified[i]:
                dl.failed[i] = dl.error
        log.error("local disk problem, not a mirror problem: download of inode %d (%d bytes) "
                  "from %s stopped: %s", dl.ino, dl.size, dl.sources[0].name, exc)

    async def _moved_key(self, dl: Download, src: Source) -> str | None:
        """The key the registry records now for this download's object on ``src``'s mirror,
        if it moved since the download started (the mirror's rename is recorded right after
        it returns, so a short wait covers a move caught half-way). None if it did not."""
        idx = self._index(src.name)
        for _ in range(MOVE_WAITS):
            with self.reg.db.begin() as txn:
                copies = self.reg.remote_copies(txn, idx, dl.ino) if idx is not None else []
            # (a file with hard links has one object per path: any of them will do)
            copies = [rc for rc in copies if not rc.ver or rc.ver == dl.ver]
            if not copies:
                return None
            for rc in copies:
                key = os.fsdecode(rc.path)
                if key != src.key:
                    return key
            await trio.sleep(MOVE_WAIT)
        return None

    async def _stream_from(self, dl: Download, src: Source, start: int) -> None:
        """Stream from chunk ``start`` to the end through three stages that overlap: the
        network read of each chunk straight into a reused buffer with its hash (``_pump``,
        in this mirror's threads), the check against the recorded digest (``_consume``, on
        the trio thread), and the cache-file write of verified chunks (``_write_chunks``, a
        worker thread).

        A chunk is readable as soon as its hash matched: from its buffer in ``dl.ring``
        until it is in the file, so readers wait for neither the disk nor a copy. A chunk
        that does not match is fetched again from the next source before anyone reads it.
        Errors are carried out of the nurseries by hand so that callers see IntegrityError /
        RemoteError themselves, not an exception group."""
        errors: list[BaseException] = []
        sink = _Sink(dl, self.store.part_path(dl.ino))
        try:
            async with src.remote.open_read(src.key, start * CHUNK_SIZE) as stream, \
                    trio.open_nursery() as writers:
                wsend, wrecv = trio.open_memory_channel[tuple[int, mmap.mmap]](WRITE_QUEUE)
                writers.start_soon(self._write_chunks, dl, sink, wrecv)
                async with wsend, trio.open_nursery() as nursery:
                    send, recv = trio.open_memory_channel[tuple[int, mmap.mmap, bytes]](
                        PIPELINE_CHUNKS)
                    nursery.start_soon(_pump, stream, dl, src, start, send, errors,
                                       self.chunk_hash_limiter)
                    try:
                        await self._consume(dl, src, start, recv, wsend, sink)
                    except (MirrorfsError, OSError) as exc:
                        errors.insert(0, exc)
                    nursery.cancel_scope.cancel()
                # the writer drains what was verified, then ends
        finally:
            sink.close()
        if sink.error is not None:
            errors.insert(0, LocalDiskError(sink.error, f"writing inode {dl.ino} to the cache"))
        if errors:
            raise errors[0]

    async def _consume(self, dl: Download, src: Source, start: int,
                       recv: trio.MemoryReceiveChannel[tuple[int, mmap.mmap, bytes]],
                       wsend: trio.MemorySendChannel[tuple[int, mmap.mmap]],
                       sink: _Sink) -> None:
        """Check each chunk the pump received and hand the good ones to the writer.

        Chunks that a ranged request verified meanwhile are dropped."""
        whole_only = dl.expected is None
        dl.front = start
        while dl.front < dl.nchunks:
            try:
                c, buf, digest = await recv.receive()
            except trio.EndOfChannel:
                return  # the pump stopped: ``errors`` says why
            if dl.first_byte is None:
                dl.first_byte = trio.current_time()
            dl.front = c + 1
            if dl.verified[c]:
                dl.pool.append(buf)
                continue
            if not whole_only:
                await self._pace(dl, c)
            if not whole_only and digest != dl.expected[c]:  # type: ignore[index]
                dl.pool.append(buf)
                self.stats.bump("verify_failures")
                log.warning("chunk %d of %s from mirror %s does not match its xxhash",
                            c, src.key, src.name)
                raise IntegrityError(f"chunk {c} from {src.name} does not match")
            dl.verified[c] = 1
            self.stats.bump("download_bytes", dl.chunk_len(c))
            old = dl.ring.pop(c, None)
            if old is not None:
                dl.pool.append(old)
            dl.ring[c] = buf
            dl.unwritten.add(c)
            if not whole_only:
                dl.notify()
            await wsend.send((c, buf))
            if sink.error is not None or (not whole_only and all(dl.verified[dl.front:])):
                return

    async def _pace(self, dl: Download, c: int) -> None:
        """Hold chunk ``c`` back while a reader that is reading would fall out of the ring.

        A reader served from ``dl.ring`` gets a view of the buffer; one that fell behind it
        reads the cache file, through the page cache: two more copies of every byte and a
        fresh page each (~10 us on VMs that hand free memory back to the host), so it falls
        further behind, and the whole stream ran at half speed (measured: a 1 GiB cold read
        at 233-310 MB/s against 470-520 when it kept up). So the stream goes at the pace of
        its slowest reader close behind it, as a plain GET goes at its reader's pace. Readers
        further back (they were already reading the file), waiting for chunks ahead, or idle
        for READER_IDLE do not hold it; the download then runs on to the end."""
        while True:
            now = trio.current_time()
            wait = [t for pos, t in dl.readers.values()
                    if now - t < READER_IDLE and RING_CHUNKS <= c - pos <= RING_CHUNKS + 1]
            if not wait:
                return
            dl.reader_moved = trio.Event()
            with trio.move_on_at(max(wait) + READER_IDLE):
                await dl.reader_moved.wait()

    async def _write_chunks(self, dl: Download, sink: _Sink,
                            recv: trio.MemoryReceiveChannel[tuple[int, mmap.mmap]]) -> None:
        """Write verified chunks to the cache file in order; a chunk that could not be
        written is no longer verified (it would be missing from the file)."""
        async with recv:
            async for c, buf in recv:
                if sink.error is None:
                    try:
                        await trio.to_thread.run_sync(sink.write, buf, c * CHUNK_SIZE,
                                                      dl.chunk_len(c),
                                                      limiter=self.disk_limiter)
                    except OSError as exc:  # reported once, by _stream_all
                        sink.error = exc
                dl.unwritten.discard(c)
                if sink.error is not None:
                    dl.verified[c] = 0
                    dl.ring.pop(c, None)
                _trim_ring(dl)

    async def _finish(self, dl: Download, src: Source) -> bool:
        """Whole-file check where that is all we have, then fsync, rename, mark local."""
        digests = whole = None
        if dl.expected is None:
            whole, digests = await trio.to_thread.run_sync(
                _hash_fd, dl.fd, dl.size, limiter=self.whole_hash_limiter)
            if dl.whole is not None and whole != dl.whole:
                self.stats.bump("verify_failures")
                log.warning("%s from mirror %s does not match its whole-file xxhash",
                            src.key, src.name)
                return False
            self.stats.bump("whole_hash_downloads" if dl.whole else "unverified_downloads")
        try:
            await trio.to_thread.run_sync(os.fsync, dl.fd, limiter=self.disk_limiter)
        except OSError as exc:
            raise LocalDiskError(exc, f"fsync of the download of inode {dl.ino}") from None
        def discard() -> None:
            # Deleted, changed or already local meanwhile: these bytes are not wanted
            # (readers that still hold the unlinked file read on from dl.fd). The
            # unlink may have removed the .part file already; a newer version's
            # download may own the name now.
            if self.downloads.get(dl.ino) is dl:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.store.part_path(dl.ino))

        def install() -> None:
            os.rename(self.store.part_path(dl.ino), self.store.path(dl.ino))

        mark_downloaded(self.reg, dl.ino, dl.ver, lambda _n: self.downloads.get(dl.ino) is dl,
                        install, discard, digests, whole)
        dl.done = True
        dl.notify()
        self.on_complete(dl.ino)
        return True


def _read_range(dl: Download, off: int, size: int) -> bytes | memoryview:
    """Verified bytes: from the ring where a chunk is there (it may not be in the file yet),
    else from the file.

    A read within one chunk in the ring is a view of its buffer, not a copy: pyfuse3 hands
    any buffer to fuse_reply_buf right after the handler returns, before anything else
    runs on the trio thread, and a buffer in the ring is never refilled (only buffers in
    ``dl.pool`` are, and the trio thread moves them there)."""
    if not dl.ring:
        return os.pread(dl.fd, size, off)
    c = off // CHUNK_SIZE
    buf = dl.ring.get(c)
    if buf is not None and (off + size - 1) // CHUNK_SIZE == c:
        base = c * CHUNK_SIZE
        return memoryview(buf)[off - base:off - base + size]
    parts = []
    pos, end = off, off + size
    while pos < end:
        c = pos // CHUNK_SIZE
        base = c * CHUNK_SIZE
        stop = min(base + CHUNK_SIZE, end)
        buf = dl.ring.get(c)
        parts.append(buf[pos - base:stop - base] if buf is not None
                     else os.pread(dl.fd, stop - pos, pos))
        pos = stop
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _trim_ring(dl: Download) -> None:
    """Return the oldest written chunks beyond RING_CHUNKS to the pool."""
    extra = len(dl.ring) - RING_CHUNKS
    if extra <= 0:
        return
    for c in [c for c in dl.ring if c not in dl.unwritten][:extra]:
        dl.pool.append(dl.ring.pop(c))


class _Sink:
    """The cache file as the stream's writer sees it (used from one worker thread at a time).

    A verified chunk is written with O_DIRECT from its (page-aligned, reused) buffer where the
    file system allows it: written through the page cache, every downloaded byte took a fresh
    page, and on this kind of VM a fresh page costs ~10 us (1 GiB ran at ~250 MB/s against
    ~1.5 GB/s through O_DIRECT). Readers close behind the stream are answered from the
    buffers (``Download.ring``), the others from the file.
    """

    def __init__(self, dl: Download, path: str) -> None:
        self.fd = dl.fd
        self.size = dl.size
        self.error: OSError | None = None  # a chunk could not be written
        self.dfd: int | None = None
        try:
            self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:  # some file systems have no O_DIRECT
            log.debug("no O_DIRECT for %s (%s): writing through the page cache", path, exc)

    def close(self) -> None:
        if self.dfd is not None:
            os.close(self.dfd)
            self.dfd = None

    def write(self, buf: mmap.mmap, off: int, n: int) -> None:
        if self.dfd is not None:
            padded = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
            try:
                _pwrite_all(self.dfd, memoryview(buf)[:padded], off)
                if padded != n:
                    os.ftruncate(self.fd, self.size)  # the padding went past the end
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.debug("O_DIRECT write refused (%s): writing through the page cache", exc)
                os.close(self.dfd)
                self.dfd = None
                os.ftruncate(self.fd, self.size)
        _pwrite_all(self.fd, memoryview(buf)[:n], off)


def _pwrite_all(fd: int, data: memoryview, off: int) -> None:
    while data:
        n = os.pwrite(fd, data, off)
        data = data[n:]
        off += n


async def _pump(stream: ReadStream, dl: Download, src: Source, start: int,
                send: trio.MemorySendChannel[tuple[int, mmap.mmap, bytes]],
                errors: list[BaseException], hash_limiter: trio.CapacityLimiter) -> None:
    """Receive chunk after chunk into buffers from ``dl.pool`` and hash each one."""
    async with send:
        try:
            for c in range(start, dl.nchunks):
                n = dl.chunk_len(c)
                buf = dl.pool.pop() if dl.pool else mmap.mmap(-1, CHUNK_SIZE)
                view = memoryview(buf)[:n]
                try:
                    got = await stream.readinto(view)
                    if got < n:
                        raise IntegrityError(f"{src.name} ended the object at "
                                             f"{c * CHUNK_SIZE + got} of {dl.size} bytes")
                    digest = await trio.to_thread.run_sync(chunk_digest, view,
                                                           limiter=hash_limiter)
                except BaseException:
                    dl.pool.append(buf)
                    raise
                finally:
                    view.release()
                await send.send((c, buf, digest))
        except (MirrorfsError, OSError) as exc:
            errors.append(exc)


def _hash_fd(fd: int, size: int) -> tuple[bytes, bytes]:
    whole = xxhash.xxh3_128()
    digests = bytearray()
    off = 0
    while off < size or (size == 0 and not digests):
        piece = os.pread(fd, CHUNK_SIZE, off)
        whole.update(piece)
        digests += chunk_digest(piece)
        off += len(piece)
        if not piece:
            break
    return whole.digest(), bytes(digests)
