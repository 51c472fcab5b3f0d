"""Unit tests of the download pipeline's inner pieces (mirrorfs/cache/fetch.py and the
ReadStream default in mirrorfs/remotes/base.py).

The streamed reads themselves are tested through real mounts in test_cache.py (S3 on moto,
FTP on pyftpdlib); these pin the parts that are hard to reach from there: O_DIRECT writes and
their page-cache fallback, the padding of the last chunk, reads answered from the ring of
chunks that are verified but not yet in the file, and readinto() over read().
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import trio

import mirrorfs.cache.fetch as fetch
from mirrorfs.cache.fetch import Download, _read_range, _Sink, _trim_ring
from mirrorfs.remotes.base import CHUNK_SIZE, ReadStream

SIZE = 2 * CHUNK_SIZE + 12345  # a short last chunk: its O_DIRECT write is padded


def make_download(path: Path, size: int = SIZE) -> Download:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    dl = Download(1, 1, size, fd, None, None, [])
    dl.verified = bytearray(dl.nchunks)
    return dl


def chunk_buffers(data: bytes) -> list[mmap.mmap]:
    out = []
    for off in range(0, len(data), CHUNK_SIZE):
        buf = mmap.mmap(-1, CHUNK_SIZE)
        piece = data[off:off + CHUNK_SIZE]
        buf[:len(piece)] = piece
        out.append(buf)
    return out


def write_all(tmp: Path) -> tuple[bool, bytes, bytes]:
    """Write SIZE random bytes chunk by chunk through a sink, last chunk first (the writer
    gets chunks in order, but nothing should depend on it); (O_DIRECT used, data, file)."""
    data = os.urandom(SIZE)
    path = tmp / "x.part"
    dl = make_download(path)
    sink = _Sink(dl, str(path))
    bufs = chunk_buffers(data)
    for c in reversed(range(len(bufs))):
        sink.write(bufs[c], c * CHUNK_SIZE, dl.chunk_len(c))
    direct = sink.dfd is not None
    sink.close()
    assert os.fstat(dl.fd).st_size == SIZE  # the padding of the last chunk was cut off
    os.close(dl.fd)
    return direct, data, path.read_bytes()


def test_sink_writes_with_o_direct(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system has no O_DIRECT (the fallback is tested below)")
    direct, data, on_disk = write_all(tmp_path)
    assert direct and on_disk == data


def test_sink_falls_back_when_o_direct_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses an O_DIRECT write (EINVAL; here: the last chunk's length
    not padded to the block size) gets the same bytes through the page cache, and the
    sink stays on the page cache from then on."""
    monkeypatch.setattr(fetch, "DIRECT_ALIGN", 1)
    direct, data, on_disk = write_all(tmp_path)
    assert on_disk == data and not direct


def test_read_range_prefers_the_ring(tmp_path: Path) -> None:
    """Verified chunks not yet written are read from their buffer (a view when the read is
    within one chunk); the others from the file, also within one read that spans both;
    trimming never drops an unwritten chunk."""
    data = os.urandom(SIZE)
    dl = make_download(tmp_path / "x.part")
    os.pwrite(dl.fd, data[:CHUNK_SIZE], 0)  # chunk 0: in the file only
    for c, buf in enumerate(chunk_buffers(data)[1:], start=1):
        dl.ring[c] = buf  # chunks 1, 2: verified, not written (the file has zeros there)
        dl.unwritten.add(c)
    off = CHUNK_SIZE - 100
    assert bytes(_read_range(dl, off, 300)) == data[off:off + 300]
    inside = _read_range(dl, 2 * CHUNK_SIZE, 12345)
    assert isinstance(inside, memoryview) and bytes(inside) == data[2 * CHUNK_SIZE:]
    assert bytes(_read_range(dl, 10, 20)) == data[10:30]
    old, fetch.RING_CHUNKS = fetch.RING_CHUNKS, 1
    try:
        _trim_ring(dl)
        assert set(dl.ring) == {1, 2}  # both unwritten: kept beyond the bound
        dl.unwritten.discard(1)
        _trim_ring(dl)
        assert set(dl.ring) == {2} and len(dl.pool) == 1
    finally:
        fetch.RING_CHUNKS = old
    os.close(dl.fd)


class Pieces(ReadStream):
    """A stream that returns its data in uneven pieces through read() only."""

    def __init__(self, data: bytes, step: int) -> None:
        self.pieces = [data[i:i + step] for i in range(0, len(data), step)]

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    async def aclose(self) -> None:
        pass


def test_default_readinto_fills_across_pieces() -> None:
    data = os.urandom(10_000)

    async def main() -> None:
        s = Pieces(data, 777)
        a, b = bytearray(4096), bytearray(8192)
        assert await s.readinto(memoryview(a)) == 4096
        n = await s.readinto(memoryview(b))
        assert n == len(data) - 4096  # short only at the end
        assert bytes(a) + bytes(b[:n]) == data
        assert await s.readinto(memoryview(b)) == 0

    trio.run(main)
