"""The three remotes against real servers on 127.0.0.1: a temp dir, moto, pyftpdlib, vsftpd.

Nothing is mocked: what a remote writes is read back through the remote and, where it helps,
straight from the server's disk or bucket. Each test runs its trio code with ``trio.run``.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import xxhash

from mirrorfs.config import mirror_defaults
from mirrorfs.errors import (
    InvalidKey,
    MirrorGone,
    NotFound,
    PermanentRemoteError,
    RemoteError,
    RemoteUnavailable,
)
from mirrorfs.probe import probe_one
from mirrorfs.remotes.base import TMP_PREFIX, ObjectMeta, Remote
from mirrorfs.remotes.dir import DirRemote
from mirrorfs.remotes.ftp import FtpRemote
from mirrorfs.remotes.s3 import S3Remote
from tests.servers import MotoS3, PyFtpd, Vsftpd, free_port, silent_server

MiB = 1024 * 1024
KINDS = ["dir", "s3", "ftp-pyftpdlib", "ftp-vsftpd"]


# -- servers and remotes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def pyftpd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PyFtpd]:
    with PyFtpd(tmp_path_factory.mktemp("pyftpd")) as server:
        yield server


@pytest.fixture(scope="module")
def vsftpd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vsftpd]:
    if not os.path.exists("/usr/sbin/vsftpd"):
        pytest.skip("vsftpd is not installed (/usr/sbin/vsftpd)")
    if os.geteuid() != 0:
        pytest.skip("vsftpd needs root to chroot its anonymous users")
    with Vsftpd(tmp_path_factory.mktemp("vsftpd")) as server:
        yield server


@dataclass
class Case:
    """One remote under test: how to build it, and where its files land on disk (if they do)."""

    kind: str
    make: Callable[..., Remote]
    disk: Path | None  # the mirror's base directory on this machine (dir, ftp)


def make_case(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> Case:
    """A fresh, empty mirror of ``kind``: its own dir, S3 prefix or FTP base directory."""
    sub = "t-" + secrets.token_hex(4)
    if kind == "dir":
        base = tmp_path / "mirror"
        base.mkdir()
        return Case(kind, lambda **o: DirRemote("m", {"path": str(base), **o}), base)
    if kind == "s3":
        moto = request.getfixturevalue("moto")
        return Case(kind, lambda **o: S3Remote("m", moto.options(prefix=sub + "/", **o)), None)
    server = request.getfixturevalue(
        "pyftpd_server" if kind == "ftp-pyftpdlib" else "vsftpd_server")
    base_dir = server.options()["base_dir"].rstrip("/") + "/" + sub
    return Case(kind, lambda **o: FtpRemote("m", server.options(base_dir=base_dir, **o)),
                server.root / sub)


@pytest.fixture(params=KINDS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return make_case(request, request.param, tmp_path)


def run(case_or_make: Case | Callable[..., Remote],
        fn: Callable[[Remote], Awaitable[None]], timeout: float = 60, **options: Any) -> None:
    """Build the remote inside a trio run, run ``fn`` on it, always close it."""
    make = case_or_make.make if isinstance(case_or_make, Case) else case_or_make

    async def main() -> None:
        remote = make(**options)
        try:
            with trio.fail_after(timeout):
                await fn(remote)
        finally:
            await remote.aclose()

    trio.run(main)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


async def read_all(remote: Remote, key: str, start: int = 0, length: int | None = None) -> bytes:
    async with remote.open_read(key, start, length) as stream:
        chunks = []
        while data := await stream.read():
            chunks.append(data)
    return b"".join(chunks)


async def all_keys(remote: Remote, prefix: str = "", limit: int = 2) -> list[str]:
    keys: list[str] = []
    cursor = None
    while True:
        page = await remote.list(prefix, cursor, limit)
        assert len(page.entries) <= limit
        keys += [e.key for e in page.entries]
        if page.cursor is None:
            return keys
        assert page.cursor == page.entries[-1].key
        cursor = page.cursor


def files_on_disk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# -- the interface, on every remote -----------------------------------------------------------

def test_put_stat_read(case: Case, tmp_path: Path) -> None:
    data = b"0123456789abcdef" * 100
    src = write(tmp_path / "src", data)

    async def body(r: Remote) -> None:
        res = await r.put("dir ä/file one.txt", src, ObjectMeta(size=len(data)))
        assert res.size == len(data)
        assert res.xxhash == xxhash.xxh3_128_hexdigest(data)
        st = await r.stat("dir ä/file one.txt")
        assert st.key == "dir ä/file one.txt" and st.size == len(data)
        assert await read_all(r, "dir ä/file one.txt") == data
        assert await read_all(r, "dir ä/file one.txt", 100, 50) == data[100:150]
        assert await read_all(r, "dir ä/file one.txt", 1590) == data[1590:]
        assert await read_all(r, "dir ä/file one.txt", 1590, 100) == data[1590:]
        assert await read_all(r, "dir ä/file one.txt", len(data) + 10, 5) == b""
        with pytest.raises(NotFound):
            await r.stat("nope")
        with pytest.raises(NotFound):
            await r.stat("dir ä")  # a directory is not an object
        with pytest.raises(NotFound):
            await read_all(r, "nope")
        with pytest.raises(NotFound):
            async with r.open_read("dir ä/nope"):
                pass

    run(case, body)
    if case.disk is not None:
        assert files_on_disk(case.disk) == ["dir ä/file one.txt"]  # no temp file left


def test_put_large(case: Case, tmp_path: Path) -> None:
    data = os.urandom(20 * MiB + 12345)
    src = write(tmp_path / "big", data)

    async def body(r: Remote) -> None:
        res = await r.put("big.bin", src, ObjectMeta(size=len(data)))
        assert (res.size, res.xxhash) == (len(data), xxhash.xxh3_128_hexdigest(data))
        assert (await r.stat("big.bin")).size == len(data)
        assert await read_all(r, "big.bin") == data
        # ranges across S3 part boundaries; on FTP each one hangs up a transfer early
        for start, length in ((5 * MiB - 100, 200), (7 * MiB, 3 * MiB + 1), (0, 1), (1, 2)):
            assert await read_all(r, "big.bin", start, length) == data[start:start + length]
        assert (await r.stat("big.bin")).size == len(data)

    opts = {"multipart_threshold": 8 * MiB, "multipart_chunksize": 5 * MiB} \
        if case.kind == "s3" else {}
    run(case, body, **opts)


def test_readinto_fills_chunks(case: Case, tmp_path: Path) -> None:
    """readinto() (what downloads use: straight into a chunk buffer on S3, through read()
    elsewhere) fills each buffer completely until the range ends, mixed with read()."""
    data = os.urandom(9 * MiB + 777)
    src = write(tmp_path / "r", data)

    async def body(r: Remote) -> None:
        await r.put("r.bin", src, ObjectMeta(size=len(data)))
        for start, length in ((0, None), (MiB + 5, 6 * MiB)):
            end = len(data) if length is None else start + length
            got = bytearray()
            async with r.open_read("r.bin", start, length) as stream:
                first = await stream.read()  # a read() first: readinto() goes on after it
                got += first
                buf = bytearray(4 * MiB)
                while n := await stream.readinto(memoryview(buf)):
                    got += buf[:n]
                    if n < len(buf):
                        break
                assert await stream.readinto(memoryview(buf)) == 0
            assert got == data[start:end]

    run(case, body)


def test_overwrite(case: Case, tmp_path: Path) -> None:
    async def body(r: Remote) -> None:
        await r.put("k", write(tmp_path / "a", b"first version"), ObjectMeta(size=13))
        await r.put("k", write(tmp_path / "b", b"second"), ObjectMeta(size=6))
        assert await read_all(r, "k") == b"second"
        assert (await r.stat("k")).size == 6

    run(case, body)


def test_list_pagination(case: Case, tmp_path: Path) -> None:
    keys = [".dot", "a", "b-x", "b/.e", "b/c", "b/d/e", "b/d/f g", "bz", "c d/é", "z"]
    src = write(tmp_path / "src", b"x")

    async def body(r: Remote) -> None:
        assert (await r.list()).entries == []
        for k in keys:
            await r.put(k, src, ObjectMeta(size=1))
        assert await all_keys(r) == sorted(keys)
        assert await all_keys(r, limit=1000) == sorted(keys)
        assert await all_keys(r, limit=3) == sorted(keys)
        assert await all_keys(r, "b/") == ["b/.e", "b/c", "b/d/e", "b/d/f g"]
        assert await all_keys(r, "b/d") == ["b/d/e", "b/d/f g"]
        assert await all_keys(r, "b") == ["b-x", "b/.e", "b/c", "b/d/e", "b/d/f g", "bz"]
        assert await all_keys(r, "nothing/") == []
        page = await r.list(cursor="b/d/e", limit=100)
        assert [e.key for e in page.entries] == ["b/d/f g", "bz", "c d/é", "z"]
        assert page.cursor is None
        sizes = {e.key: e.size for e in (await r.list()).entries}
        assert sizes == dict.fromkeys(keys, 1)
        await r.probe()
        assert await all_keys(r) == sorted(keys)  # nothing left behind by the probe

    run(case, body)


def test_rename(case: Case, tmp_path: Path) -> None:
    async def body(r: Remote) -> None:
        await r.put("x/a", write(tmp_path / "a", b"aaa"), ObjectMeta(size=3))
        await r.rename("x/a", "x/b")
        assert await read_all(r, "x/b") == b"aaa"
        with pytest.raises(NotFound):
            await r.stat("x/a")
        await r.rename("x/b", "new/deep/c")  # into directories that do not exist yet
        assert await read_all(r, "new/deep/c") == b"aaa"
        await r.put("other", write(tmp_path / "o", b"other"), ObjectMeta(size=5))
        await r.rename("other", "new/deep/c")  # replaces the target
        assert await read_all(r, "new/deep/c") == b"other"
        assert await all_keys(r) == ["new/deep/c"]
        with pytest.raises(NotFound):
            await r.rename("missing", "whatever")
        await r.rename("new/deep/c", "new/deep/c")

    run(case, body)
    if case.disk is not None:  # the emptied source directory was pruned
        assert sorted(p.name for p in case.disk.iterdir()) == ["new"]


def test_delete(case: Case, tmp_path: Path) -> None:
    async def body(r: Remote) -> None:
        src = write(tmp_path / "a", b"a")
        await r.put("p/q/r", src, ObjectMeta(size=1))
        await r.put("p/keep", src, ObjectMeta(size=1))
        await r.delete("p/q/r")
        with pytest.raises(NotFound):
            await r.stat("p/q/r")
        await r.delete("p/q/r")  # replayed
        await r.delete("never/was")
        assert await all_keys(r) == ["p/keep"]

    run(case, body)
    if case.disk is not None:  # p/q went with its last file; p still holds one
        assert sorted(str(p.relative_to(case.disk)) for p in case.disk.rglob("*")) == [
            "p", "p/keep"]


def test_probe(case: Case) -> None:
    async def body(r: Remote) -> None:
        await r.probe()
        assert (await r.list()).entries == []

    run(case, body)


def test_common_key_rejections(case: Case, tmp_path: Path) -> None:
    async def body(r: Remote) -> None:
        with pytest.raises(InvalidKey):
            r.check_key("")
        with pytest.raises(InvalidKey):
            await r.put("", write(tmp_path / "a", b"a"), ObjectMeta(size=1))

    run(case, body)


def test_missing_local_file_is_oserror(case: Case, tmp_path: Path) -> None:
    """The local cache file vanished: not the mirror's fault, so not a RemoteError."""
    async def body(r: Remote) -> None:
        with pytest.raises(FileNotFoundError):
            await r.put("a", str(tmp_path / "gone"), ObjectMeta(size=1))
        with pytest.raises(NotFound):
            await r.stat("a")

    run(case, body)


def test_url(case: Case) -> None:
    async def body(r: Remote) -> None:
        assert r.url("a b/c") == "https://cdn.example/m/a%20b/c"

    run(case, body, url_base="https://cdn.example/m/")

    async def none(r: Remote) -> None:
        assert r.url("a") is None

    run(case, none)


# -- S3 ------------------------------------------------------------------------------------

def s3_case(moto: MotoS3, **extra: Any) -> Callable[..., Remote]:
    prefix = "t-" + secrets.token_hex(4) + "/"
    return lambda **o: S3Remote("s3m", moto.options(prefix=prefix, **{**extra, **o}))


def test_s3_metadata(moto: MotoS3, tmp_path: Path) -> None:
    data = b"hello metadata"
    src = write(tmp_path / "a", data)
    meta = ObjectMeta(size=len(data), xxhash=xxhash.xxh3_128_hexdigest(data),
                      mtime_ns=1_700_000_000_123_456_789, mode=0o640)

    async def body(r: Remote) -> None:
        await r.put("m/obj.txt", src, meta)
        st = await r.stat("m/obj.txt")
        assert st.meta == meta and st.etag
        listed = (await r.list()).entries[0]
        assert listed.meta is None and listed.etag == st.etag and listed.size == len(data)
        new = ObjectMeta(size=len(data), xxhash=meta.xxhash, mtime_ns=5, mode=0o600)
        await r.update_meta("m/obj.txt", new)
        assert (await r.stat("m/obj.txt")).meta == new
        assert await read_all(r, "m/obj.txt") == data
        await r.rename("m/obj.txt", "n/obj.txt")
        assert (await r.stat("n/obj.txt")).meta == new

    run(s3_case(moto), body)
    head = moto.client().list_objects_v2(Bucket=moto.bucket)["Contents"]
    ours = [o for o in head if o["Key"].endswith("n/obj.txt")]
    assert len(ours) == 1
    obj = moto.client().head_object(Bucket=moto.bucket, Key=ours[0]["Key"])
    assert obj["ContentType"] == "text/plain"


def test_s3_multipart_copy(moto: MotoS3, tmp_path: Path) -> None:
    """Objects over the copy limit (5 GiB on S3) are renamed with upload_part_copy."""
    data = os.urandom(12 * MiB + 7)
    src = write(tmp_path / "big", data)
    meta = ObjectMeta(size=len(data), xxhash=xxhash.xxh3_128_hexdigest(data), mode=0o644)

    async def body(r: Remote) -> None:
        assert isinstance(r, S3Remote)
        r.copy_limit = 6 * MiB
        r.copy_part_size = 5 * MiB
        await r.put("big", src, meta)
        await r.rename("big", "moved/big")
        assert await read_all(r, "moved/big") == data
        assert (await r.stat("moved/big")).meta == meta
        new = ObjectMeta(size=len(data), xxhash=meta.xxhash, mode=0o600)
        await r.update_meta("moved/big", new)
        assert (await r.stat("moved/big")).meta == new
        assert await read_all(r, "moved/big", 5 * MiB - 3, 6) == data[5 * MiB - 3:5 * MiB + 3]

    run(s3_case(moto, multipart_threshold=8 * MiB, multipart_chunksize=5 * MiB), body)


def test_s3_multipart_parts_carry_crc32(moto: MotoS3, tmp_path: Path) -> None:
    """As boto3's transfer manager does: with request checksums "when_supported" (botocore's
    default) every part carries a CRC32 and the object a composite one, so the server never
    has to compute a whole-object checksum when the upload completes; with "when_required"
    no checksum is asked for."""
    data = os.urandom(11 * MiB)
    src = write(tmp_path / "big", data)
    meta = ObjectMeta(size=len(data), xxhash=xxhash.xxh3_128_hexdigest(data), mode=0o644)
    keys: dict[str, str] = {}

    async def body(r: Remote) -> None:
        assert isinstance(r, S3Remote)
        await r.put("big", src, meta)
        assert await read_all(r, "big") == data
        keys[r._get_client().meta.config.request_checksum_calculation] = r.prefix + "big"

    opts = {"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}
    run(s3_case(moto, **opts), body)
    run(s3_case(moto, request_checksum_calculation="when_required", **opts), body)
    client = moto.client()
    head = client.head_object(Bucket=moto.bucket, Key=keys["when_supported"],
                              ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32"), head
    head = client.head_object(Bucket=moto.bucket, Key=keys["when_required"],
                              ChecksumMode="ENABLED")
    assert "ChecksumCRC32" not in head


def test_s3_failed_multipart_is_aborted(moto: MotoS3, tmp_path: Path) -> None:
    src = write(tmp_path / "big", os.urandom(16 * MiB))
    make = s3_case(moto, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    async def body(r: Remote) -> None:
        assert isinstance(r, S3Remote)
        real = r._upload_part

        async def failing(full: str, upload_id: str, number: int, data: bytes,
                          checksum: dict[str, str]) -> dict[str, str]:
            if number == 2:
                raise PermanentRemoteError("injected failure of part 2")
            return await real(full, upload_id, number, data, checksum)

        r._upload_part = failing  # type: ignore[method-assign]
        with pytest.raises(PermanentRemoteError, match="injected"):
            await r.put("big", src, ObjectMeta(size=16 * MiB))
        with pytest.raises(NotFound):
            await r.stat("big")

    run(make, body)
    assert moto.client().list_multipart_uploads(Bucket=moto.bucket).get("Uploads", []) == []


def test_s3_cancelled_multipart_is_aborted(moto: MotoS3, tmp_path: Path) -> None:
    src = write(tmp_path / "big", os.urandom(30 * MiB))
    make = s3_case(moto, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    async def body(r: Remote) -> None:
        assert isinstance(r, S3Remote)
        real = r._upload_part
        first_part_sent = trio.Event()

        async def watched(full: str, upload_id: str, number: int, data: bytes,
                          checksum: dict[str, str]) -> dict[str, str]:
            entry = await real(full, upload_id, number, data, checksum)
            first_part_sent.set()
            return entry

        r._upload_part = watched  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            async def put() -> None:
                await r.put("big", src, ObjectMeta(size=30 * MiB))
                raise AssertionError("the put was not cancelled")

            nursery.start_soon(put)
            await first_part_sent.wait()
            nursery.cancel_scope.cancel()
        with pytest.raises(NotFound):
            await r.stat("big")

    run(make, body)
    assert moto.client().list_multipart_uploads(Bucket=moto.bucket).get("Uploads", []) == []


def test_s3_options(moto: MotoS3, tmp_path: Path) -> None:
    """The botocore knobs are accepted and the storage class sticks through copies."""
    data = os.urandom(6 * MiB)
    src = write(tmp_path / "a", data)
    make = s3_case(moto, storage_class="STANDARD_IA", signature_version="s3v4",
                   request_checksum_calculation="when_required",
                   response_checksum_validation="when_required", concurrency=2,
                   connect_timeout=5, read_timeout=30, multipart_threshold=5 * MiB,
                   multipart_chunksize=5 * MiB, verify_tls=True)
    keys: list[str] = []

    async def body(r: Remote) -> None:
        assert isinstance(r, S3Remote)
        await r.put("small", write(tmp_path / "s", b"s"), ObjectMeta(size=1))
        await r.put("big", src, ObjectMeta(size=len(data)))
        await r.rename("small", "moved")
        await r.update_meta("big", ObjectMeta(size=len(data), mode=0o600))
        assert await read_all(r, "big") == data
        keys.extend(r.prefix + k for k in ("moved", "big"))

    run(make, body)
    client = moto.client()
    for key in keys:
        assert client.head_object(Bucket=moto.bucket, Key=key).get("StorageClass") == \
            "STANDARD_IA"


def test_s3_key_rejections(moto: MotoS3) -> None:
    async def body(r: Remote) -> None:
        r.check_key("a" * (1024 - len("t-xxxxxxxx/")))
        with pytest.raises(InvalidKey, match="1024"):
            r.check_key("a" * 1014)
        with pytest.raises(InvalidKey, match="1024"):
            r.check_key("é" * 507)
        with pytest.raises(InvalidKey, match="UTF-8"):
            r.check_key(os.fsdecode(b"caf\xe9"))
        with pytest.raises(InvalidKey):
            await r.stat(os.fsdecode(b"caf\xe9"))

    run(s3_case(moto), body)


def test_remote_defaults_are_the_config_defaults() -> None:
    """A remote built from a few keys (as here) takes what it lacks from the config's option
    specs, the one place defaults are declared: they used to disagree (S3 concurrency 8 in
    the remote, 4 in the config; FTP password "anonymous@" against "")."""
    s3 = S3Remote("s", {"bucket": "b"})
    assert (s3.concurrency, s3.prefix) == (mirror_defaults("s3")["concurrency"], "")
    ftp = FtpRemote("f", {"host": "127.0.0.1"})
    ftp_defaults = mirror_defaults("ftp")
    assert (ftp.password, ftp.user, ftp.port, ftp.connections, ftp.timeout) == tuple(
        ftp_defaults[k] for k in ("password", "user", "port", "connections", "timeout"))


def test_s3_missing_bucket_is_a_mirror_gone(moto: MotoS3) -> None:
    """The probe's caller tells a config error (at mount) from a mirror that went away."""
    async def body(r: Remote) -> None:
        with pytest.raises(MirrorGone, match="does not exist"):
            await r.probe()
        assert (await probe_one(r))[0] == "error"

    run(lambda **o: S3Remote("s3m", moto.options(bucket="no-such-bucket")), body)


def http_attempts(r: Remote) -> list[str]:
    """Every HTTP request the S3 remote's boto3 client sends from now on (botocore emits
    before-send once per attempt), to see that a failure is not retried behind the caller."""
    assert isinstance(r, S3Remote)
    sent: list[str] = []

    def hook(request: Any, **kwargs: Any) -> None:
        sent.append(f"{request.method} {request.url}")

    r._get_client().meta.events.register("before-send.s3", hook)
    return sent


def test_s3_server_restart(tmp_path: Path) -> None:
    """Down: calls fail fast with RemoteUnavailable (one attempt each: neither botocore nor
    @retry retries while the server is away). Back: the same remote works again."""
    src = write(tmp_path / "a", b"abc")
    with MotoS3() as server:
        async def body(r: Remote) -> None:
            await r.put("one", src, ObjectMeta(size=3))
            await trio.to_thread.run_sync(server.stop)
            sent = http_attempts(r)
            with pytest.raises(RemoteUnavailable):
                await r.put("two", src, ObjectMeta(size=3))
            assert len(sent) == 1, sent
            with pytest.raises(RemoteUnavailable):
                await read_all(r, "one")
            assert len(sent) == 2, sent
            await trio.to_thread.run_sync(server.start)
            await r.put("two", src, ObjectMeta(size=3))
            assert await all_keys(r) == ["one", "two"]

        run(lambda **o: S3Remote("s3m", server.options(prefix="restart/")), body)


def test_s3_unreachable(tmp_path: Path) -> None:
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "bucket": "b",
               "access_key_id": "x", "secret_access_key": "y"}

    async def body(r: Remote) -> None:
        sent = http_attempts(r)
        with pytest.raises(RemoteUnavailable):
            await r.probe()
        assert len(sent) == 1, sent  # fails at once: no retry

    run(lambda **o: S3Remote("s3m", options), body)


# -- FTP -----------------------------------------------------------------------------------

FTP_KINDS = ["ftp-pyftpdlib", "ftp-vsftpd"]


@pytest.fixture(params=FTP_KINDS)
def ftp_case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return make_case(request, request.param, tmp_path)


def test_ftp_key_rejections(ftp_case: Case, tmp_path: Path) -> None:
    async def body(r: Remote) -> None:
        for key in ("a\r\nDELE b", "a\nb", "a\rb", "a\0b", "x/ leading", "trailing /x",
                    os.fsdecode(b"caf\xe9"), "../up", "/abs", "a//b"):
            with pytest.raises(InvalidKey):
                r.check_key(key)
        with pytest.raises(InvalidKey, match="CR"):
            await r.put("evil\r\nDELE x", write(tmp_path / "a", b"a"), ObjectMeta(size=1))
        with pytest.raises(InvalidKey):
            await r.stat("x\ny")

    run(ftp_case, body)


def dropped_after_hang_up(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The FTP remote's debug lines for a connection it could not bring back in step after
    an early hang-up (a resync that failed or ran into its timeout)."""
    return [r.getMessage() for r in caplog.records
            if "dropping connection after an early hang-up" in r.getMessage()]


def test_ftp_partial_reads_keep_the_pool_usable(ftp_case: Case, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """With one connection, every early hang-up must give it back in step with the server:
    the resync succeeds each time (no connection dropped, none waited out its timeout)."""
    caplog.set_level(logging.DEBUG, logger="mirrorfs.remotes.ftp")
    data = os.urandom(6 * MiB)
    src = write(tmp_path / "a", data)

    async def body(r: Remote) -> None:
        await r.put("f", src, ObjectMeta(size=len(data)))
        for i in range(5):
            async with r.open_read("f", i * 1000) as stream:
                first = await stream.read()
            assert first == data[i * 1000:i * 1000 + len(first)] and first
            assert (await r.stat("f")).size == len(data)
        assert not dropped_after_hang_up(caplog)
        with trio.move_on_after(0.05):
            await read_all(r, "f")
        assert await read_all(r, "f", 10, 10) == data[10:20]

    run(ftp_case, body, connections=1)


def test_ftps_vsftpd(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Explicit FTPS against vsftpd: verified certificate, protected data, session reuse."""
    if not Vsftpd.available(tls=True):
        pytest.skip("needs vsftpd, root and the openssl tool")
    data = os.urandom(3 * MiB)
    src = write(tmp_path / "a", data)
    with Vsftpd(tmp_path / "vs", tls=True) as server:
        async def body(r: Remote) -> None:
            await r.probe()
            res = await r.put("d/x", src, ObjectMeta(size=len(data)))
            assert res.xxhash == xxhash.xxh3_128_hexdigest(data)
            caplog.set_level(logging.DEBUG, logger="mirrorfs.remotes.ftp")
            for start in range(0, 5000, 1000):  # early hang-ups of TLS data connections
                assert await read_all(r, "d/x", start, 10) == data[start:start + 10]
            assert not dropped_after_hang_up(caplog)  # each resync succeeded
            assert await read_all(r, "d/x") == data
            assert await all_keys(r) == ["d/x"]
            await r.rename("d/x", "e/y")
            await r.delete("e/y")
            assert await all_keys(r) == []

        run(lambda **o: FtpRemote("f", server.options(**o)), body)

        async def untrusted(r: Remote) -> None:
            with pytest.raises(PermanentRemoteError, match="certificate"):
                await r.probe()

        run(lambda **o: FtpRemote("f", server.options(ca_bundle=None)), untrusted)

        async def unverified(r: Remote) -> None:
            await r.probe()

        run(lambda **o: FtpRemote("f", server.options(ca_bundle=None, verify_tls=False)),
            unverified)

        async def plain(r: Remote) -> None:
            with pytest.raises(PermanentRemoteError, match="530"):
                await r.probe()

        run(lambda **o: FtpRemote("f", server.options(tls=False)), plain)


def test_ftp_wrong_password(pyftpd_server: PyFtpd) -> None:
    async def body(r: Remote) -> None:
        with pytest.raises(PermanentRemoteError, match="530"):
            await r.probe()

    run(lambda **o: FtpRemote("f", pyftpd_server.options(password="wrong")), body)


def test_ftp_unreachable_is_quick() -> None:
    """A closed port: probe and stat raise RemoteUnavailable at once. Run on trio's mock
    clock, which jumps over every sleep or timeout of trio's: the clock not moving shows no
    backoff and no retry before the error."""
    options = {"host": "127.0.0.1", "port": free_port(), "timeout": 5}

    async def main() -> None:
        r = FtpRemote("f", options)
        try:
            with pytest.raises(RemoteUnavailable):
                await r.probe()
            with pytest.raises(RemoteUnavailable):
                await r.stat("x")
            assert trio.current_time() == 0.0
        finally:
            await r.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_ftp_silent_server_times_out() -> None:
    """A server that accepts and never answers: the probe gives up after its timeout, on one
    connection (not retried: the mirror is down, the uploader probes it again later)."""
    with silent_server() as server:
        async def body(r: Remote) -> None:
            with pytest.raises(RemoteUnavailable, match="timed out"):
                await r.probe()
            assert server.connections == 1

        run(lambda **o: FtpRemote("f", {"host": "127.0.0.1", "port": server.port,
                                        "timeout": 1}), body)


def test_ftp_server_restart(tmp_path: Path) -> None:
    """Pooled connections die with the server. The first call after a restart reconnects by
    itself (RemoteUnavailable is not retried by @retry); while it is down, calls fail fast."""
    with PyFtpd(tmp_path / "root") as server:
        src = write(tmp_path / "a", b"abc")

        async def body(r: Remote) -> None:
            async with trio.open_nursery() as nursery:  # two pooled connections
                nursery.start_soon(r.put, "one", src, ObjectMeta(size=3))
                nursery.start_soon(r.put, "two", src, ObjectMeta(size=3))
            await trio.to_thread.run_sync(server.restart)
            await r.put("three", src, ObjectMeta(size=3))
            assert await read_all(r, "one") == b"abc"
            await trio.to_thread.run_sync(server.stop)
            with pytest.raises(RemoteUnavailable):
                await r.probe()
            with pytest.raises(RemoteUnavailable):
                await r.put("four", src, ObjectMeta(size=3))
            (server.root / "written-while-down").write_bytes(b"x")
            await trio.to_thread.run_sync(server.start)
            await r.put("five", src, ObjectMeta(size=3))
            assert await all_keys(r) == ["five", "one", "three", "two", "written-while-down"]

        run(lambda **o: FtpRemote("f", server.options()), body)
    assert not [p for p in (tmp_path / "root").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_ftp_cancelled_trio_caller(ftp_case: Case, tmp_path: Path) -> None:
    """A trio cancel reaches the asyncio task, the pool gets its connection slot back, and the
    half-written temp file is removed (by a clean-up task that aclose waits for)."""
    src = write(tmp_path / "a", os.urandom(32 * MiB))
    cancelled = 0

    async def body(r: Remote) -> None:
        nonlocal cancelled
        for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
            with trio.move_on_after(delay) as scope:
                await r.put("big", src, ObjectMeta(size=32 * MiB))
            cancelled += scope.cancelled_caught
        await r.put("small", write(tmp_path / "s", b"s"), ObjectMeta(size=1))
        assert await read_all(r, "small") == b"s"
        # cancels that land while a download opens must not keep the only connection
        for i in range(30):
            with trio.move_on_after(i * 0.0003):
                async with r.open_read("small") as stream:
                    await stream.read()
            with trio.fail_after(5):
                assert (await r.stat("small")).size == 1

    run(ftp_case, body, connections=1, timeout=30)
    assert cancelled >= 3
    assert ftp_case.disk is not None
    left = [n for n in files_on_disk(ftp_case.disk) if n not in ("big", "small")]
    assert left == []


# -- dir -----------------------------------------------------------------------------------

def dir_remote(base: Path) -> Callable[..., Remote]:
    return lambda **o: DirRemote("d", {"path": str(base), **o})


def test_dir_metadata(tmp_path: Path) -> None:
    base = tmp_path / "m"
    base.mkdir()
    data = b"content"
    src = write(tmp_path / "a", data)
    meta = ObjectMeta(size=len(data), xxhash=xxhash.xxh3_128_hexdigest(data),
                      mtime_ns=1_600_000_000_000_000_001, mode=0o640)
    try:
        os.setxattr(src, "user.probe", b"1")
        xattrs = True
    except OSError:
        xattrs = False

    async def body(r: Remote) -> None:
        await r.put("a/b", src, meta)
        st = os.stat(base / "a/b")
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == meta.mtime_ns
        rs = await r.stat("a/b")
        assert rs.mtime_ns == meta.mtime_ns
        assert rs.meta == (meta if xattrs else None)
        new = ObjectMeta(size=len(data), xxhash=meta.xxhash, mtime_ns=2_000_000_000, mode=0o600)
        await r.update_meta("a/b", new)
        st = os.stat(base / "a/b")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2_000_000_000
        rs = await r.stat("a/b")
        assert rs.meta == (new if xattrs else None)

    run(dir_remote(base), body)


def test_dir_refuses_to_leave_its_base(tmp_path: Path) -> None:
    base = tmp_path / "m"
    outside = tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (base / "link").symlink_to(outside)
    (base / "filelink").symlink_to(outside / "secret")
    src = write(tmp_path / "a", b"a")

    async def body(r: Remote) -> None:
        for key in ("../outside/secret", "/etc/passwd", "a/./b", "a\0b", TMP_PREFIX + "x"):
            with pytest.raises(InvalidKey):
                r.check_key(key)
            with pytest.raises(InvalidKey):
                await r.stat(key)
        with pytest.raises(PermanentRemoteError, match="symlink"):
            await r.put("link/new", src, ObjectMeta(size=1))
        with pytest.raises(NotFound):
            await r.stat("link/secret")
        with pytest.raises(NotFound):
            await read_all(r, "filelink")
        with pytest.raises(NotFound):
            await r.rename("link/secret", "stolen")
        await r.delete("link/secret")
        assert await all_keys(r) == []
        await r.put("filelink", src, ObjectMeta(size=1))  # replaces the link, not its target

    run(dir_remote(base), body)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert not (base / "filelink").is_symlink()


def test_dir_non_utf8_names(tmp_path: Path) -> None:
    base = tmp_path / "m"
    base.mkdir()
    key = os.fsdecode(b"caf\xe9/n\xffme")

    async def body(r: Remote) -> None:
        await r.put(key, write(tmp_path / "a", b"abc"), ObjectMeta(size=3))
        assert await read_all(r, key) == b"abc"
        assert await all_keys(r) == [key]
        assert r.url(key) == "http://x/caf%E9/n%FFme"

    run(dir_remote(base), body, url_base="http://x")
    assert (base / os.fsdecode(b"caf\xe9") / os.fsdecode(b"n\xffme")).read_bytes() == b"abc"


def test_dir_base_missing_is_unavailable(tmp_path: Path) -> None:
    async def body(r: Remote) -> None:
        with pytest.raises(RemoteUnavailable):
            await r.probe()
        with pytest.raises(RemoteError):
            await r.put("a", write(tmp_path / "a", b"a"), ObjectMeta(size=1))

    async def main() -> None:
        r = DirRemote("d", {"path": str(tmp_path / "unplugged")})
        await body(r)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not (tmp_path / "unplugged").exists()


