"""Issue 6: bad input of every kind gets a clear error or a safe mapping, never touches data
outside the mount and never corrupts other entries.

- odd names (CR/LF, non-UTF-8 bytes, 255-byte multibyte names, reserved prefixes) and a
  100-level deep path, through the mount and on to S3, FTP and a directory mirror: each
  mirror stores the name exactly or fails that one job visibly (``queue``), others go on;
- configs with every kind of mistake: exit 2 and one line, for ``mount``, ``check-config``
  and the admin commands (tests/test_cli.py has the first few kinds; these are the rest);
- ``mirrorfs import`` of a bucket holding keys such as ``../x``, ``/abs``, ``a//b``, a key
  that is both a file and a directory, setuid modes and lying metadata;
- remote objects whose bytes or metadata lie after an upload: a read gives the right bytes
  or EIO, never other bytes;
- a full cache disk (a 64 MiB tmpfs, ``min_free = 0``): ENOSPC, the daemon stays up,
  nothing written before is lost, and writing works again once uploads make files clean.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.mountutil import drop_page_cache, is_mounted, small_tmpfs
from tests.servers import bucket_objects as s3_tree
from tests.test_cli import EXIT_USAGE, cli
from tests.test_mirrors import admin, drain

MiB = 1 << 20


def expect_errno(err: int, fn: Any, *args: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == err, (fn, args, info.value)


def files_below(root: Path | bytes) -> dict[bytes, bytes]:
    """Regular files below ``root`` by relative bytes path (names need not be UTF-8)."""
    base = os.fsencode(root)
    out = {}
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            p = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(p).st_mode) and not f.startswith(b".mirrorfs-"):
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, base)] = fh.read()
    return out


# ---------------------------------------------------------------------- names


ODD_NAMES: dict[bytes, bytes] = {
    b"plain.txt": b"control",
    b"cr\rname": b"carriage return",
    b"lf\nname": b"line feed",
    b"crlf\r\nDELE plain.txt": b"command injection attempt",
    b"latin1-\xe9t\xe9": b"not utf-8",
    b"\xff\xfe\xfd": b"not utf-8 at all",
    "€".encode() * 85: b"255 bytes of UTF-8",
    b"x" * 255: b"255 ascii",
    b".mirrorfs-tmp-planted": b"the dir mirror's temp prefix",
    b" leading space": b"white space",
    b"back\\slash": b"backslash",
    b"-dash": b"dash",
    b"%2e%2e": b"url-encoded dots",
}


def test_odd_names_reach_each_mirror_or_fail_cleanly(make_mount: Any, s3: Any, ftp: Any,
                                                     tmp_path: Path) -> None:
    (tmp_path / "dm").mkdir()
    # moto's server cannot route keys holding LF (real S3 stores them): keep those from it
    m = make_mount({"s3": {"type": "s3", **s3.options(), "exclude": ["lf*", "crlf*"]},
                    "ftp": {"type": "ftp", **ftp.options()},
                    "dir": {"type": "dir", "path": str(tmp_path / "dm")}}, upload_delay=0)
    m.expect_log(r"cannot store")
    root = os.fsencode(m.path)
    for name, data in ODD_NAMES.items():
        with open(root + b"/" + name, "wb") as f:
            f.write(data)
    expect_errno(errno.ENAMETOOLONG, os.open, root + b"/" + "€".encode() * 85 + b"x",
                 os.O_WRONLY | os.O_CREAT)
    deep = b"/".join(b"d%02d" % i for i in range(100))
    os.makedirs(root + b"/" + deep)
    with open(root + b"/" + deep + b"/leaf", "wb") as f:
        f.write(b"one hundred levels down")
    want = dict(ODD_NAMES)
    want[deep + b"/leaf"] = b"one hundred levels down"
    r = admin(m, "drain", "--timeout", "120")
    assert r["drained"], r
    queue = admin(m, "queue")
    failed = {(q["mirror"], os.fsencode(q["path"])): q["error"] for q in queue
              if q["state"] == "failed" and "\\x" not in q["path"]}
    failed_any = {(q["mirror"], q["path"]) for q in queue if q["state"] == "failed"}
    holdings = {
        "dir": files_below(tmp_path / "dm"),
        "ftp": files_below(ftp.root),
        "s3": {os.fsencode(k): v for k, v in s3_tree(s3).items()},
    }
    matrix = {}
    for mirror, held in holdings.items():
        for key, data in held.items():
            assert want.get(key) == data, f"{mirror} holds {key!r} with other bytes"
        for name in want:
            matrix[(mirror, name)] = "stored" if name in held else "refused"
    print("\n".join(f"{mi:4} {st:8} {n[:40]!r}" for (mi, n), st in sorted(matrix.items())))
    # every mirror stores the plain names, and the deep path
    for mirror in holdings:
        for name in (b"plain.txt", b"back\\slash", b"-dash", b"%2e%2e", b"x" * 255,
                     "€".encode() * 85, deep + b"/leaf"):
            assert matrix[(mirror, name)] == "stored", (mirror, name)
    # what each refuses, and why (a failed job each, visible in the queue)
    assert matrix[("ftp", b"crlf\r\nDELE plain.txt")] == "refused"
    assert matrix[("ftp", b"cr\rname")] == "refused"
    assert matrix[("s3", b"\xff\xfe\xfd")] == "refused"
    assert matrix[("dir", b".mirrorfs-tmp-planted")] == "refused"
    assert matrix[("s3", b"lf\nname")] == "refused"  # excluded, not failed
    assert ("ftp", b"cr\rname") in failed and "CR" in failed[("ftp", b"cr\rname")]
    assert ("dir", b".mirrorfs-tmp-planted") in failed
    assert any(mi == "s3" for mi, _p in failed_any), queue
    injected = [c for c in ftp.commands if ("plain.txt" in c and "DELE" in c)
                or "\r" in c or "\n" in c]
    assert not injected, injected
    st = admin(m, "stats")
    assert st["mirrors"]["s3"]["failed"] >= 2 and st["mirrors"]["dir"]["failed"] == 1
    # locally every name is intact, also after a remount
    assert m.umount() == 0
    m.start()
    for name, data in want.items():
        with open(root + b"/" + name, "rb") as f:
            assert f.read() == data, name
    assert sorted(os.listdir(root)) == sorted([n for n in ODD_NAMES] + [b"d00"])


# ---------------------------------------------------------------------- configs


S3 = '[mirrors.s]\ntype = "s3"\nbucket = "bucket-1"\n'
BAD_CONFIGS: dict[str, tuple[str, str, str]] = {
    # name: (config text, key named in the message, problem named in the message)
    "bad-endpoint-url": ('cache_dir = "c"\n' + S3 + 'endpoint_url = "localhost:9000"\n',
                         "mirrors.s.endpoint_url", "expected an http:// or https:// URL"),
    "ftp-url-as-endpoint": ('cache_dir = "c"\n' + S3 + 'endpoint_url = "ftp://x/"\n',
                            "mirrors.s.endpoint_url", "expected an http:// or https:// URL"),
    "bad-url-base": ('cache_dir = "c"\n[mirrors.d]\ntype = "dir"\npath = "/x"\n'
                     'url_base = "not a url"\n', "mirrors.d.url_base", "URL"),
    "bad-bucket-name": ('cache_dir = "c"\n[mirrors.s]\ntype = "s3"\nbucket = "Bad_Bucket"\n',
                        "mirrors.s.bucket", "not a valid bucket name"),
    "bad-size": ('cache_dir = "c"\ncache_size = "10 apples"\n', "cache_size",
                 "expected a size"),
    "negative-size": ('cache_dir = "c"\nmin_free = -5\n', "min_free", "negative"),
    "negative-delay": ('cache_dir = "c"\nupload_delay = -1\n', "upload_delay", "negative"),
    "delay-as-string": ('cache_dir = "c"\nupload_delay = "30s"\n', "upload_delay",
                        "expected a number of seconds"),
    "bad-log-level": ('cache_dir = "c"\nlog_level = "CHATTY"\n', "log_level",
                      "expected DEBUG, INFO, WARNING or ERROR"),
    "zero-concurrency": ('cache_dir = "c"\n' + S3 + "concurrency = 0\n",
                         "mirrors.s.concurrency", "must be at least 1"),
    "include-not-a-list": ('cache_dir = "c"\n' + S3 + 'include = "*.jpg"\n',
                           "mirrors.s.include", "expected a list of strings"),
    "bad-delete-policy": ('cache_dir = "c"\n' + S3 + 'delete_policy = "sometimes"\n',
                          "mirrors.s.delete_policy", "expected one of"),
    "read-order-unknown": ('cache_dir = "c"\nread_order = ["nope"]\n', "read_order",
                           "unknown mirror 'nope'"),
    "mirrors-not-a-table": ('cache_dir = "c"\nmirrors = 5\n', "mirrors",
                            "expected a table"),
    "mirror-not-a-table": ('cache_dir = "c"\nmirrors = { a = "s3" }\n', "mirrors.a",
                           "expected a table"),
    "mirror-without-type": ('cache_dir = "c"\n[mirrors.a]\nbucket = "b"\n', "mirrors.a.type",
                            "missing (required)"),
    "ftp-without-host": ('cache_dir = "c"\n[mirrors.f]\ntype = "ftp"\n', "mirrors.f.host",
                         "missing (required)"),
    "ftp-port-as-string": ('cache_dir = "c"\n[mirrors.f]\ntype = "ftp"\nhost = "h"\n'
                           'port = "21"\n', "mirrors.f.port", "expected an integer"),
    "secret-file-missing": ('cache_dir = "c"\n' + S3
                            + 'secret_access_key_file = "/nonexistent/secret"\n',
                            "mirrors.s.secret_access_key_file", "cannot read"),
    "password-file-missing": ('cache_dir = "c"\n[mirrors.f]\ntype = "ftp"\nhost = "h"\n'
                              'password_file = "/nonexistent/pw"\n',
                              "mirrors.f.password_file", "cannot read"),
    "duplicate-key": ('cache_dir = "c"\ncache_dir = "d"\n', "(syntax)", ""),
    "not-utf8": ('cache_dir = "c\udcff"\n', "(syntax)", ""),
    "empty-file": ("", "cache_dir", "missing (required)"),
    "binary-garbage": ("\x00\x01\x02PK\x03\x04", "(syntax)", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_every_config_mistake_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    text, key, problem = BAD_CONFIGS[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(text.encode("utf-8", "surrogateescape"))
    (tmp_path / "mnt").mkdir()
    for args in (["mount", "--foreground", str(cfg), str(tmp_path / "mnt")],
                 ["check-config", str(cfg)],
                 ["stats", "-c", str(cfg)]):
        r = cli(*args)
        assert r.returncode == EXIT_USAGE, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1, (args, r.stderr)
        assert str(cfg) in lines[0] and key in lines[0] and problem in lines[0], lines[0]
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert not is_mounted(tmp_path / "mnt")
    assert sorted(os.listdir(tmp_path)) == ["bad.toml", "mnt"]  # nothing was created


def test_config_that_is_a_directory_or_unreadable_secret(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "adir.toml").mkdir()
    r = cli("mount", str(tmp_path / "adir.toml"), str(tmp_path / "mnt"))
    assert r.returncode == EXIT_USAGE
    assert r.stderr.splitlines() == [
        f"mirrorfs: invalid config: {tmp_path / 'adir.toml'}: (file): is a directory"]
    secret = tmp_path / "secret"
    secret.mkdir()  # a directory where a secret file should be: unreadable as a file
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'cache_dir = "c"\n{S3}secret_access_key_file = "{secret}"\n')
    r = cli("mount", str(cfg), str(tmp_path / "mnt"))
    assert r.returncode == EXIT_USAGE
    assert len(r.stderr.splitlines()) == 1 and "secret_access_key_file" in r.stderr


# ---------------------------------------------------------------------- import


def _put(client: Any, bucket: str, key: str, body: bytes, **meta: str) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)


def test_import_of_a_hostile_bucket_maps_safely(make_mount: Any, s3: Any,
                                                tmp_path: Path) -> None:
    c = s3.client()
    b = s3.bucket
    canary = tmp_path / "x"  # where "../x" would land if a key could climb out
    good = {"ok/file.txt": b"fine", "top.txt": b"top", "a/b/c.txt": b"nested"}
    for k, v in good.items():
        _put(c, b, k, v)
    hostile = {"../x": b"climb out", "/abs": b"absolute", "a//b": b"double slash",
               "./dot": b"dot", "x/../y": b"dot dot inside", "dir/": b"",
               ".mirrorfs-tmp-1": b"our temp prefix", "n" * 256: b"name too long",
               "ok/file.txt/inner": b"file used as a directory"}
    for k, v in hostile.items():
        _put(c, b, k, v)
    data = os.urandom(300_000)
    _put(c, b, "setuid.bin", data, **{"mirrorfs-mode": "4755",
                                      "mirrorfs-xxh3": xxhash.xxh3_128_hexdigest(data),
                                      "mirrorfs-size": str(len(data))})
    _put(c, b, "size-lies.bin", b"ten bytes!", **{"mirrorfs-size": "999999"})
    _put(c, b, "hash-lies.bin", b"the bytes", **{
        "mirrorfs-size": "9", "mirrorfs-xxh3": xxhash.xxh3_128_hexdigest(b"other")})
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    m.expect_log(r"cannot be a path in the mount")
    m.expect_log(r"says it holds")
    m.expect_log(r"does not match its whole-file xxhash")
    m.expect_log(r"no mirror has good bytes")
    (m.path / "local.txt").write_text("mine")
    r = admin(m, "import", "s3", check=False)  # exit 1: it names the keys it skipped
    print(f"import: {r}")
    assert r["rejected"] >= 6, r
    assert {s["key"] for s in r["skipped"]} >= {"../x", "/abs", "a//b", "./dot"}, r
    assert not canary.exists()
    assert not Path("/abs").exists()
    names = sorted(str(p.relative_to(m.path)) for p in m.path.rglob("*"))
    print(names)
    for k, v in good.items():
        assert (m.path / k).read_bytes() == v
    assert (m.path / "local.txt").read_text() == "mine"
    # exactly the safe keys became paths; nothing was merged, renamed or overwritten
    assert sorted(os.listdir(m.path)) == sorted(  # "dir/": an S3 folder marker, a directory
        ["ok", "top.txt", "a", "setuid.bin", "size-lies.bin", "hash-lies.bin", "local.txt",
         "dir"])
    assert os.listdir(m.path / "dir") == [] and r["dirs"] == 1
    assert os.listdir(m.path / "a") == ["b"] and os.listdir(m.path / "ok") == ["file.txt"]
    assert r["blocked"] == 1  # ok/file.txt/inner: a file cannot be a directory too
    # no setuid bit from a foreign bucket
    st = os.stat(m.path / "setuid.bin")
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(st.st_mode)
    assert (m.path / "setuid.bin").read_bytes() == data
    # metadata that lies about the size is not trusted; the bytes are what the object holds
    assert (m.path / "size-lies.bin").read_bytes() == b"ten bytes!"
    # metadata whose hash does not match the bytes: EIO, never unverified bytes
    expect_errno(errno.EIO, (m.path / "hash-lies.bin").read_bytes)
    # the import touched no other bucket entry and the mount still works
    assert s3_tree(s3)["top.txt"] == b"top"
    (m.path / "after.txt").write_text("still writable")
    drain(m)


# ---------------------------------------------------------------------- lying objects


def test_objects_that_lie_after_upload_never_give_wrong_bytes(make_mount: Any, s3: Any) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    for p in (r"does not match", r"no mirror has good bytes", r"ended the object"):
        m.expect_log(p)
    c = s3.client()
    originals = {f"f{i}.bin": os.urandom(9 * MiB + 1000 * i) for i in range(5)}
    for name, data in originals.items():
        (m.path / name).write_bytes(data)
    drain(m)
    heads = {n: c.head_object(Bucket=s3.bucket, Key=n) for n in originals}
    flipped = bytearray(originals["f0.bin"])
    flipped[5 * MiB] ^= 1
    other = os.urandom(len(originals["f4.bin"]) + 77)
    lies = {
        # same length, one bit flipped, original metadata (hash and size) kept
        "f0.bin": (bytes(flipped), heads["f0.bin"]["Metadata"]),
        # right bytes, metadata claiming another size and hash
        "f1.bin": (originals["f1.bin"], {"mirrorfs-size": "5",
                                         "mirrorfs-xxh3": "0" * 32}),
        # cut short, metadata claiming the full size
        "f2.bin": (originals["f2.bin"][:5 * MiB], heads["f2.bin"]["Metadata"]),
        # longer than it should be
        "f3.bin": (originals["f3.bin"] + b"trailing junk", heads["f3.bin"]["Metadata"]),
        # other bytes with metadata that matches them
        "f4.bin": (other, {"mirrorfs-size": str(len(other)),
                           "mirrorfs-xxh3": xxhash.xxh3_128_hexdigest(other)}),
    }
    for name, (body, meta) in lies.items():
        c.put_object(Bucket=s3.bucket, Key=name, Body=body, Metadata=meta)
    assert not admin(m, "evict", *[str(m.path / n) for n in originals])["kept"]
    results = {}
    for name, data in originals.items():
        drop_page_cache(m.path / name)
        try:
            got = (m.path / name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, (name, exc)
            results[name] = "EIO"
            continue
        assert got == data, f"{name}: a read returned bytes that are not the file's"
        results[name] = "right bytes"
    print(results)
    assert results["f0.bin"] == results["f2.bin"] == results["f4.bin"] == "EIO"
    assert results["f1.bin"] == "right bytes"
    m.wait_for(lambda: admin(m, "stats")["verify_failures"] >= 2)


# ---------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs for the cache directory, unmounted at the end."""
    d = tmp_path / "small"
    d.mkdir()
    with small_tmpfs(d, "64m"):
        yield d


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_full_cache_disk_gives_enospc_and_recovers(small_disk: Path, make_mount: Any,
                                                   tmp_path: Path) -> None:
    (tmp_path / "dm").mkdir()
    m = make_mount({"dir": {"type": "dir", "path": str(tmp_path / "dm")}},
                   cache_dir=str(small_disk / "cache"), upload_delay=0, min_free=0,
                   cache_size="1G", dirty_limit="1G", paused=True)
    m.expect_log(r"No space left|disk is full|ENOSPC")
    written: dict[str, bytes] = {}
    err = None
    for i in range(40):
        data = os.urandom(4 * MiB)
        try:
            _write(m.path / f"f{i:02d}", data)
        except OSError as exc:
            err = exc
            break
        written[f"f{i:02d}"] = data
    assert err is not None and err.errno == errno.ENOSPC, err
    print(f"{len(written)} files of 4 MiB fit before ENOSPC")
    assert len(written) >= 8
    # the daemon is up, answers, and everything acknowledged is intact
    assert m.proc is not None and m.proc.poll() is None
    for name, data in written.items():
        drop_page_cache(m.path / name)
        assert (m.path / name).read_bytes() == data, name
    # The file whose close failed: on this mount, without dropping anything, readers see
    # what the daemon stored (what a remount shows), not what the kernel still cached of
    # the failed writes (before: all 4 MiB, until the inode left the kernel's cache).
    failed = m.path / f"f{len(written):02d}"
    m.wait_for(lambda: admin(m, "stats")["unstored_pages_dropped"] >= 1)
    seen_here = failed.read_bytes()
    assert seen_here != data, "the bytes of the failed writes are still served"
    # still full: a new file cannot take a whole 4 MiB, but the mount answers
    with contextlib.suppress(OSError):
        _write(m.path / "more", os.urandom(4 * MiB))
    st = admin(m, "stats")
    assert st["files"] >= len(written)
    # uploads make the files clean; new writes evict them to make room
    admin(m, "resume")
    drain(m)
    for i in range(6):
        data = os.urandom(4 * MiB)
        _write(m.path / f"after{i}", data)
        written[f"after{i}"] = data
    st = admin(m, "stats")
    assert st["evictions"] >= 3, st
    for name, data in written.items():
        drop_page_cache(m.path / name)
        assert (m.path / name).read_bytes() == data, name
    assert m.umount() == 0
    m.start()
    assert failed.read_bytes() == seen_here, "the failed file reads differently after a remount"


def test_cache_disk_filled_by_another_program(small_disk: Path, make_mount: Any,
                                              tmp_path: Path) -> None:
    """The reserve only helps if mirrorfs is alone on the disk. Another program filling it
    makes registry commits fail (LMDB: no space): the daemon must stay up, refuse what it
    cannot record, lose nothing acknowledged, and carry on once the space is back. An
    upload job whose commit failed used to take the whole mount down."""
    (tmp_path / "dm").mkdir()
    m = make_mount({"dir": {"type": "dir", "path": str(tmp_path / "dm")}},
                   cache_dir=str(small_disk / "cache"), upload_delay=0, min_free=0,
                   paused=True)
    for p in (r"failed unexpectedly", r"could not requeue", r"unexpected error in",
              r"No space left", r"DiskError", r"^Traceback"):
        m.expect_log(p)
    files = {f"f{i}": os.urandom(3 * MiB) for i in range(4)}
    files.update({f"small{i:04d}-{'x' * 150}": b"%d" % i for i in range(1500)})
    for name, data in files.items():
        _write(m.path / name, data)
    filler = small_disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * MiB)
    made = 0
    with contextlib.suppress(OSError):  # metadata until the registry itself has no room
        for i in range(20_000):
            os.mkdir(m.path / f"dir{i:05d}-{'y' * 200}")
            made += 1
    print(f"{made} directories made on the full disk")
    admin(m, "resume")  # uploads run; recording them needs registry pages
    time.sleep(3)
    assert m.proc is not None and m.proc.poll() is None, "the daemon died"
    st = admin(m, "stats")
    print(f"while full: {st['mirrors']['dir']['uploads']} uploads, "
          f"{st['mirrors']['dir']['pending']} pending")
    with contextlib.suppress(OSError):
        _write(m.path / "during", b"x" * 100_000)
    assert m.proc.poll() is None, "the daemon died"
    for name, data in files.items():
        drop_page_cache(m.path / name)
        assert (m.path / name).read_bytes() == data, name
    filler.unlink()
    drain(m)
    assert files == {n: (tmp_path / "dm" / n).read_bytes() for n in files}
    log = m.log_text()
    print(f"registry commits refused while full: {log.count('No space left')}")
    (m.path / "after").write_bytes(b"room again")
    drain(m)
    assert m.umount() == 0
    m.start()
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data, name
