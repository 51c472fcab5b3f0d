"""Unit tests of the download pipeline's inner pieces (mirrorfs/cache/fetch.py).

The streamed reads themselves are tested through real mounts in test_cache.py; these pin the
parts that are hard to reach from there: O_DIRECT writes and their page-cache fallback, the
padding of the last chunk, chunks skipped because a ranged request verified them, and reads
answered from the ring of chunks that are verified but not yet in the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirrorfs.cache.fetch import Download, _read_range, _Sink, _trim_ring
from mirrorfs.hashing import chunk_digest
from mirrorfs.remotes.base import CHUNK_SIZE

SIZE = 2 * CHUNK_SIZE + 12345  # a short last chunk: its O_DIRECT write is padded


def make_download(path: Path, size: int = SIZE) -> Download:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    dl = Download(1, 1, size, fd, None, None, [])
    dl.verified = bytearray(dl.nchunks)
    return dl


def pieces(data: bytes, step: int) -> list[bytes]:
    return [data[i:i + step] for i in range(0, len(data), step)]


def sink_roundtrip(tmp: Path) -> tuple[bool, bytes, bytes]:
    """Stream SIZE random bytes through a sink; (O_DIRECT used, the bytes, the file)."""
    data = os.urandom(SIZE)
    path = tmp / "x.part"
    dl = make_download(path)
    sink = _Sink(dl, 0, str(path))
    done = []
    for batch in (pieces(data, 1_000_003)[:3], pieces(data, 1_000_003)[3:]):
        done += sink.absorb(batch, set())
    assert [c for c, _, _ in done] == [0, 1, 2]
    for c, digest, buf in done:
        chunk = data[c * CHUNK_SIZE:(c + 1) * CHUNK_SIZE]
        assert digest == chunk_digest(chunk)
        assert buf is not None and buf[:len(chunk)] == chunk
        sink.write(buf, c * CHUNK_SIZE, len(chunk))
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
    path = tmp_path / "x.part"
    dl = make_download(path)
    sink = _Sink(dl, 0, str(path))
    assert sink.dfd is not None
    sink.close()
    os.close(dl.fd)
    direct, data, on_disk = sink_roundtrip(tmp_path)
    assert direct and on_disk == data


def test_sink_falls_back_when_o_direct_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses an O_DIRECT write (EINVAL; here: the last chunk's length
    not padded to the block size) gets the same bytes through the page cache."""
    import mirrorfs.cache.fetch as fetch

    monkeypatch.setattr(fetch, "DIRECT_ALIGN", 1)
    direct, data, on_disk = sink_roundtrip(tmp_path)
    assert on_disk == data
    assert not direct or os.statvfs(tmp_path).f_bsize == 1  # fell back at the last chunk


def test_sink_skips_chunks_verified_elsewhere(tmp_path: Path) -> None:
    """A chunk a ranged request verified while the stream was in it is neither copied nor
    hashed (no digest), and the next chunk's hash starts clean."""
    data = os.urandom(SIZE)
    path = tmp_path / "x.part"
    dl = make_download(path)
    sink = _Sink(dl, 0, str(path))
    half = CHUNK_SIZE // 2
    first = sink.absorb([data[:half]], set())
    assert first == []
    rest = sink.absorb(pieces(data[half:], 999_999), {0})
    assert [(c, d) for c, d, _ in rest][:1] == [(0, None)]
    assert rest[1][0] == 1 and rest[1][1] == chunk_digest(data[CHUNK_SIZE:2 * CHUNK_SIZE])
    assert rest[2][0] == 2 and rest[2][1] == chunk_digest(data[2 * CHUNK_SIZE:])
    sink.close()
    os.close(dl.fd)


def test_read_range_prefers_the_ring(tmp_path: Path) -> None:
    """Verified chunks not yet written are read from their buffer; the others from the
    file, also within one read that spans both; trimming never drops an unwritten chunk."""
    data = os.urandom(SIZE)
    path = tmp_path / "x.part"
    dl = make_download(path)
    os.pwrite(dl.fd, data[:CHUNK_SIZE], 0)  # chunk 0: in the file only
    sink = _Sink(dl, CHUNK_SIZE, str(path))
    done = sink.absorb([data[CHUNK_SIZE:]], set())
    for c, _, buf in done:
        assert buf is not None
        dl.ring[c] = buf  # chunks 1, 2: verified, not written (the file has zeros there)
        dl.unwritten.add(c)
    off = CHUNK_SIZE - 100
    assert _read_range(dl, off, 300) == data[off:off + 300]
    assert _read_range(dl, 2 * CHUNK_SIZE, 12345) == data[2 * CHUNK_SIZE:]
    assert _read_range(dl, 10, 20) == data[10:30]
    import mirrorfs.cache.fetch as fetch

    old, fetch.RING_CHUNKS = fetch.RING_CHUNKS, 1
    try:
        _trim_ring(dl)
        assert set(dl.ring) == {1, 2}  # both unwritten: kept beyond the bound
        dl.unwritten.discard(1)
        _trim_ring(dl)
        assert set(dl.ring) == {2} and len(dl.pool) == 1
    finally:
        fetch.RING_CHUNKS = old
    sink.close()
    os.close(dl.fd)
