"""Issue 4: remote-only files streamed back through the real mount, verified, in a bounded cache."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mountutil import Mount, resident_bytes, write_config
from tests.test_mirrors import admin, drain

MiB = 1 << 20


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def evict(m: Mount, *paths: Path) -> dict[str, Any]:
    r = admin(m, "evict", *[str(p) for p in paths])
    assert not r["kept"], r
    drop_caches()
    return r


def cache_bytes(m: Mount) -> int:
    root = m.config.parent / "cache" / "data"
    return sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file())


def s3_mirror(s3: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "s3", **s3.options(**extra)}


def remote_only(m: Mount, name: str, size: int) -> bytes:
    """A new file of random bytes, uploaded, then evicted: the next read streams it."""
    data = os.urandom(size)
    (m.path / name).write_bytes(data)
    drain(m)
    evict(m, m.path / name)
    return data


def test_evict_then_read_back_counts_miss_then_hits(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    data = os.urandom(9 * MiB + 123)  # three chunks, the last one short
    (m.path / "v.bin").write_bytes(data)
    drain(m)
    before = admin(m, "stats")
    assert admin(m, "state", str(m.path / "v.bin"))["v.bin"]["state"] == "uploaded"
    evict(m, m.path / "v.bin")
    st = admin(m, "stats")
    assert st["remote_only_files"] == 1 and st["local_bytes"] == 0
    # metadata of a remote-only file needs no network
    assert os.stat(m.path / "v.bin").st_size == len(data)
    assert (m.path / "v.bin").read_bytes() == data
    m.wait_for(lambda: admin(m, "stats")["local_files"] == 1)
    for _ in range(3):
        drop_caches()
        assert (m.path / "v.bin").read_bytes() == data
    # online, stats adds the counts not yet flushed to LMDB
    st = m.wait_for(lambda: (s := admin(m, "stats"))["hits"] - before["hits"] >= 3 and s)
    assert st["misses"] - before["misses"] == 1
    assert st["download_bytes"] - before["download_bytes"] == len(data)
    assert st["verify_failures"] == 0


def test_remote_only_file_is_writable_and_truncatable(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    data = os.urandom(5 * MiB)
    (m.path / "w.bin").write_bytes(data)
    drain(m)
    evict(m, m.path / "w.bin")
    with open(m.path / "w.bin", "r+b") as f:
        f.seek(MiB)
        f.write(b"X" * 10)
    expect = data[:MiB] + b"X" * 10 + data[MiB + 10:]
    assert (m.path / "w.bin").read_bytes() == expect
    drain(m)
    evict(m, m.path / "w.bin")
    os.truncate(m.path / "w.bin", 100)
    assert (m.path / "w.bin").read_bytes() == expect[:100]


def _first_byte_and_total(path: Path) -> tuple[float, float]:
    drop_caches()
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        f.read(4096)
        first = time.monotonic() - t0
        while f.read(MiB):
            pass
    return first, time.monotonic() - t0


def test_first_bytes_are_served_before_the_download_ends(make_mount: Any,
                                                         tmp_path: Path) -> None:
    """Streaming: the first read of a remote-only file returns while the rest of it is still
    on its way (an FTP server sending 4 MiB/s; the download's end is the daemon's log line).
    How early, against the whole download, is measured by the perf test below."""
    from tests.servers import PyFtpd

    with PyFtpd(tmp_path / "slow-ftp", write_limit=4 * MiB) as slow:
        m = make_mount({"ftp": {"type": "ftp", **slow.options()}}, upload_delay=0)
        data = remote_only(m, "movie.bin", 12 * MiB)
        with open(m.path / "movie.bin", "rb", buffering=0) as f:
            assert f.read(4096) == data[:4096]
            assert not _downloads(m, "movie.bin"), "the first bytes waited for the whole file"
            assert f.read() == data[4096:]
        m.wait_for(lambda: len(_downloads(m, "movie.bin")) == 1)


@pytest.mark.perf
def test_streaming_over_ftp_serves_first_bytes_early(make_mount: Any, ftp: Any) -> None:
    """First bytes of a 256 MiB remote-only file arrive in under a tenth of its full download
    time (both measured in this run, FTP server streaming from disk)."""
    m = make_mount({"ftp": {"type": "ftp", **ftp.options()}}, upload_delay=0)
    with open(m.path / "movie.bin", "wb") as f:
        block = os.urandom(MiB)
        for i in range(256):
            f.write(block[:-4] + i.to_bytes(4, "big"))
    drain(m, timeout=300)
    ratios = []
    for _ in range(2):
        evict(m, m.path / "movie.bin")
        first, total = _first_byte_and_total(m.path / "movie.bin")
        ratios.append(first / total)
    print(f"ftp first byte / full read: {ratios}")
    assert min(ratios) < 0.1, ratios


@pytest.mark.perf
def test_s3_first_byte_close_to_plain_get(make_mount: Any, s3: Any) -> None:
    """First byte through mirrorfs within 1.3x of a plain boto3 GET's first byte of the same
    object, compared side by side (medians of alternating runs; moto reads the whole object
    before answering, so its own first-byte time grows with size)."""
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    with open(m.path / "obj.bin", "wb") as f:  # 256 MiB, as in the FTP case
        block = os.urandom(MiB)
        for i in range(256):
            f.write(block[:-4] + i.to_bytes(4, "big"))
    drain(m, timeout=300)
    client = s3.client()
    ours, theirs = [], []
    for _ in range(5):
        evict(m, m.path / "obj.bin")  # (drops the page cache, moto's spooled copy too)
        warm = client.get_object(Bucket=s3.bucket, Key="obj.bin")["Body"]
        while warm.read(8 * MiB):  # untimed: both timed reads find moto's copy warm
            pass
        t0 = time.monotonic()
        with open(m.path / "obj.bin", "rb", buffering=0) as f:
            f.read(1)
            ours.append(time.monotonic() - t0)
            while f.read(MiB):  # let the download finish before the next eviction
                pass
        t0 = time.monotonic()
        body = client.get_object(Bucket=s3.bucket, Key="obj.bin")["Body"]
        body.read(1)
        theirs.append(time.monotonic() - t0)
        body.close()
    # The best of each: on a shared, noisy machine the minimum is what each path costs.
    ratio = min(ours) / min(theirs)
    print(f"s3 first byte: mirrorfs {ours} boto3 {theirs} ratio {ratio:.2f}")
    assert ratio < 1.3, (ours, theirs)


def test_two_readers_share_one_download(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    data = os.urandom(40 * MiB)
    (m.path / "shared.bin").write_bytes(data)
    drain(m)
    evict(m, m.path / "shared.bin")
    s3.start_recording()
    procs = [subprocess.Popen(["sha256sum", str(m.path / "shared.bin")],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split()[0] for p in procs]
    import hashlib

    assert outs == [hashlib.sha256(data).hexdigest()] * 2
    gets = [p for meth, p in s3.recorded() if meth == "GET" and p.endswith("/shared.bin")]
    assert len(gets) == 1, gets


@pytest.mark.parametrize("direct", [False, True])
def test_stream_direct_io_reads_and_mmap(make_mount: Any, s3: Any, direct: bool) -> None:
    """stream_direct_io: the cold read returns the same bytes, through small and large reads;
    mmap(MAP_PRIVATE) works either way; mmap(MAP_SHARED) of an open made while the file was
    remote-only fails with ENODEV only with the option (libfuse 3.14 cannot ask the kernel
    for FUSE_DIRECT_IO_ALLOW_MMAP), as the README says. Once local, opens are cached again."""
    import mmap

    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0, stream_direct_io=direct)
    data = os.urandom(10 * MiB + 77)
    (m.path / "d.bin").write_bytes(data)
    drain(m)
    evict(m, m.path / "d.bin")
    with open(m.path / "d.bin", "rb", buffering=0) as f:
        got = bytearray()
        while piece := f.read(4096 if len(got) < MiB else MiB):
            got += piece
        assert got == data
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mm:
            assert mm[5 * MiB:5 * MiB + 10] == data[5 * MiB:5 * MiB + 10]
        if direct:
            with pytest.raises(OSError) as exc:
                mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            assert exc.value.errno == errno.ENODEV
        else:
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
                assert mm[-10:] == data[-10:]
    m.wait_for(lambda: admin(m, "stats")["local_files"] == 1)
    with open(m.path / "d.bin", "rb") as local, \
            mmap.mmap(local.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
        assert mm[:] == data


def test_read_far_ahead_uses_a_ranged_request(make_mount: Any, s3: Any) -> None:
    """A read far ahead of the stream gets a GET of its own chunk (moto's request log shows
    its Range header), not a wait for the stream from the start to get there."""
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    data = os.urandom(64 * MiB)
    (m.path / "seek.bin").write_bytes(data)
    drain(m)
    evict(m, m.path / "seek.bin")
    s3.start_recording()
    with open(m.path / "seek.bin", "rb", buffering=0) as f:
        f.seek(60 * MiB)
        assert f.read(1000) == data[60 * MiB:60 * MiB + 1000]
        ranges = [h.get("Range", "") for meth, p, h in s3.recorded_requests()
                  if meth == "GET" and p.endswith("/seek.bin")]
        # the chunk holding offset 60 MiB (4 MiB chunks: 15), asked for on its own
        assert f"bytes={60 * MiB}-{64 * MiB - 1}" in ranges, ranges
        f.seek(0)
        assert f.read(1000) == data[:1000]
    assert (m.path / "seek.bin").read_bytes() == data


def _downloads(m: Mount, name: str) -> list[float]:
    """Seconds of each completed download of ``name``, from the daemon's INFO lines."""
    return [float(t) for t in re.findall(
        rf"downloaded {name} \(inode \d+, \d+ bytes\) from \S+ in ([\d.]+) s", m.log_text())]


def _download_seconds(m: Mount, name: str) -> float | None:
    found = _downloads(m, name)
    return found[-1] if found else None


def test_stream_keeps_pace_with_a_slow_reader_and_not_an_idle_one(make_mount: Any,
                                                                    s3: Any) -> None:
    """The stream stays within the memory ring of a reader that reads (one that fell out of
    it would read the cache file instead, at half the speed), and runs on to the end when
    the reader stops reading. Where the reader was when the download ended is read from the
    daemon's log line, not timed."""
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    data = remote_only(m, "slow.bin", 128 * MiB)
    got = bytearray()
    ended_at = None  # bytes the reader had when the download was over
    with open(m.path / "slow.bin", "rb", buffering=0) as f:
        while piece := f.read(MiB):
            got += piece
            if ended_at is None and _downloads(m, "slow.bin"):
                ended_at = len(got)
            time.sleep(0.02)
    assert got == data
    # Paced, the stream ends when the reader is at most ~12 chunks (48 MiB) behind it:
    # after ~80 of the reader's 128 MiB (or after the reader's end). Unpaced, moto sends
    # 128 MiB while the reader is at its first MiBs.
    print(f"download over when the reader had {ended_at} bytes")
    assert ended_at is None or ended_at >= 128 * MiB - 13 * 4 * MiB, ended_at

    evict(m, m.path / "slow.bin")
    with open(m.path / "slow.bin", "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]
        # no more reads: the download must not wait for this reader
        m.wait_for(lambda: len(_downloads(m, "slow.bin")) == 2, timeout=60)
        assert f.read() == data[MiB:]


def test_streamed_read_drops_the_pages_behind_its_reader(make_mount: Any, s3: Any) -> None:
    """A cold read leaves only its last pages in the kernel's page cache of the mount (the
    bytes are in the cache file), and the file reads back the same from there."""
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0)
    data = remote_only(m, "big.bin", 128 * MiB)
    got = bytearray()
    with open(m.path / "big.bin", "rb", buffering=0) as f:
        while piece := f.read(MiB):
            got += piece
    assert got == data
    m.wait_for(lambda: _download_seconds(m, "big.bin"))
    # DROP_LAG + DROP_STEP = 40 MiB at most; without the drop-behind all 128 MiB stay
    assert resident_bytes(m.path / "big.bin") <= 48 * MiB
    assert (m.path / "big.bin").read_bytes() == data


def test_corrupt_first_mirror_reads_from_second_then_eio(make_mount: Any, s3: Any) -> None:
    second = s3.bucket + "-b"
    s3.create_bucket(second)
    m = make_mount({"one": s3_mirror(s3), "two": s3_mirror(s3, bucket=second)},
                   upload_delay=0, read_order=["one", "two"])
    m.expect_log(r"does not match")
    m.expect_log(r"no mirror has good bytes")
    data = os.urandom(6 * MiB)
    (m.path / "c.bin").write_bytes(data)
    drain(m)
    client = s3.client()
    bad = bytearray(data)
    bad[5 * MiB] ^= 0xFF
    client.put_object(Bucket=s3.bucket, Key="c.bin", Body=bytes(bad))
    evict(m, m.path / "c.bin")
    assert (m.path / "c.bin").read_bytes() == data
    m.wait_for(lambda: admin(m, "stats")["verify_failures"] >= 1)
    # both corrupt: EIO, never wrong bytes
    client.put_object(Bucket=second, Key="c.bin", Body=bytes(bad))
    evict(m, m.path / "c.bin")
    with open(m.path / "c.bin", "rb") as f:
        assert f.read(MiB) == data[:MiB]  # the first chunks are still good on both
        with pytest.raises(OSError) as exc:
            f.read()
    assert exc.value.errno == errno.EIO
    log = m.log_text()
    assert "chunk 1 of c.bin from mirror one does not match" in log
    assert "from mirror two does not match" in log


def test_cache_stays_within_bound_while_writing_three_times_it(make_mount: Any,
                                                               s3: Any) -> None:
    bound = 24 * MiB
    fsize = 2 * MiB
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=0, cache_size=bound,
                   dirty_limit=8 * MiB, min_free=0)
    files = {}
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, cache_bytes(m))
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    try:
        for i in range(3 * bound // fsize):
            data = os.urandom(fsize)
            (m.path / f"f{i:03d}").write_bytes(data)
            files[f"f{i:03d}"] = data
        drain(m)
        time.sleep(1.5)
    finally:
        stop.set()
        t.join()
    print(f"peak cache {peak / MiB:.1f} MiB, bound {bound / MiB:.0f} MiB")
    assert peak <= bound + fsize, peak
    st = admin(m, "stats")
    assert st["evictions"] > 0
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data
    assert cache_bytes(m) <= bound + fsize


def test_mirrors_down_full_dirty_cache_gives_enospc(make_mount: Any, ftp: Any) -> None:
    m = make_mount({"ftp": {"type": "ftp", **ftp.options(timeout=2)}}, upload_delay=0,
                   dirty_limit=8 * MiB)
    m.expect_log(r"unreachable")
    ftp.stop()
    written = {}
    with pytest.raises(OSError) as exc:
        for i in range(10):
            data = os.urandom(MiB)
            with open(m.path / f"d{i}", "wb") as f:
                f.write(data)
            written[f"d{i}"] = data
    assert exc.value.errno == errno.ENOSPC
    assert len(written) >= 7
    for name, data in written.items():
        assert (m.path / name).read_bytes() == data
    assert os.stat(m.path).st_mode  # the daemon is alive
    # once the mirror is back the dirty data drains and writing works again
    ftp.start()
    drain(m)
    (m.path / "after").write_bytes(os.urandom(MiB))


def test_startup_check_turns_missing_content_remote_only_or_lost(make_mount: Any,
                                                                 s3: Any) -> None:
    m = make_mount({"s3": s3_mirror(s3)}, upload_delay=3600)
    (m.path / "clean.bin").write_bytes(b"c" * 1000)
    admin(m, "drain")
    (m.path / "dirty.bin").write_bytes(b"d" * 1000)
    st = admin(m, "state", str(m.path / "clean.bin"), str(m.path / "dirty.bin"))
    assert [v["state"] for v in st.values()] == ["uploaded", "dirty"]
    m.kill()
    m.expect_log(r"flagged LOST")
    m.expect_log(r"now remote-only")
    data = m.config.parent / "cache" / "data"
    for f in data.rglob("*"):
        if f.is_file():
            f.unlink()
    m.start()
    assert (m.path / "clean.bin").read_bytes() == b"c" * 1000
    st = admin(m, "state", str(m.path / "dirty.bin"))
    assert st["dirty.bin"]["state"] == "lost"
    assert "dirty.bin" in m.log_text()


def test_unreachable_mirror_never_drops_a_clean_copy(make_mount: Any, ftp: Any) -> None:
    """A clean file whose only mirror is unreachable keeps its local copy, the only one that
    can be read: the cache bound (the space keeper) and `mirrorfs evict` both try to drop it
    and must not. Once the mirror is back, the keeper evicts it and it streams back."""
    ftp_mirror = {"ftp": {"type": "ftp", **ftp.options(timeout=2)}}
    m = make_mount(ftp_mirror, upload_delay=0)
    m.expect_log(r"unreachable")
    data = os.urandom(5000)
    (m.path / "keep.bin").write_bytes(data)
    drain(m)
    m.umount()
    ftp.stop()
    # restart unreachable, with a bound the file alone exceeds: the keeper wants it gone
    write_config(m.config, {"cache_dir": str(m.config.parent / "cache"), "log_level": "INFO",
                            "upload_delay": 0, "cache_size": 1000}, ftp_mirror)
    m.start()
    assert admin(m, "stats")["mirrors"]["ftp"]["up"] is False
    assert admin(m, "evict", str(m.path / "keep.bin"))["kept"] == ["keep.bin"]
    drop_caches()
    assert (m.path / "keep.bin").read_bytes() == data
    st = admin(m, "stats")
    assert (st["local_files"], st["evictions"]) == (1, 0), st
    ftp.start()  # back: the keeper may now drop the local copy, which streams back
    m.wait_for(lambda: admin(m, "stats")["remote_only_files"] == 1, timeout=60)
    drop_caches()
    assert (m.path / "keep.bin").read_bytes() == data
