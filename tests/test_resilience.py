"""Issue 16: a daemon that never falls over.

- every supervised task survives an unexpected exception (injected through the daemon's
  test seam, ``MIRRORFS_TEST_HOOKS=1`` + the ``test-fail`` control command): the mount keeps
  answering and the restart is counted in ``stats``;
- malformed change-log records (hypothesis) fed to two live nodes on moto: quarantined, each
  listed once by ``mirrorfs problems``, the good records around them applied;
- ENOSPC while downloading is a local disk problem, not a mirror problem;
- ``import`` of a bucket with an over-long and a non-UTF-8 key imports the rest, exits 1 and
  names both;
- a write that fails on a full disk leaves none of its data in the DEBUG log.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mirrorfs.changelog import parse_record
from mirrorfs.control import ControlClient
from mirrorfs.errors import BadRecord
from tests.mountutil import REPO, Mount, drop_page_cache, small_tmpfs
from tests.test_mirrors import CLI, admin, drain, s3_objects
from tests.test_multinode import node, read_or_none

MiB = 1 << 20
HOOKS = {"MIRRORFS_TEST_HOOKS": "1"}


def control(m: Mount, cmd: str, **args: Any) -> Any:
    client = ControlClient(str(Path(m.config).parent / "cache"), timeout=30)
    try:
        return client.call(cmd, **args)
    finally:
        client.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


# ---------------------------------------------------------------------- supervisor


def test_every_supervised_task_restarts_after_an_unexpected_exception(
        make_mount: Any, s3: Any, tmp_path: Path) -> None:
    opts = {"type": "s3", **s3.options(), "pull": True, "pull_interval": 0.3,
            "rescan_interval": 3600}
    m = make_mount({"s3": opts}, env=HOOKS, node_id="A", upload_delay=0.1)
    for p in (r"test hooks enabled", r"task \S+ failed unexpectedly", r"^Traceback",
              r"InjectedFault"):
        m.expect_log(p)
    tasks = admin(m, "stats")["tasks"]
    assert set(tasks) >= {"flush", "signals", "space", "uploader:s3", "pull:s3", "control",
                          "stats"}, tasks
    assert all(t["restarts"] == 0 for t in tasks.values())
    for i, name in enumerate(sorted(tasks)):
        with contextlib.suppress(ConnectionError, OSError):  # "control" cuts its own answer
            control(m, "test-fail", task=name)

        def restarted(name: str = name) -> bool:
            try:
                t = control(m, "stats")["tasks"][name]
            except (OSError, ConnectionError):  # the control socket is coming back
                return False
            return bool(t["restarts"] == 1 and t["running"])

        m.wait_for(restarted, timeout=30, interval=0.2)
        # the mount keeps answering: write, read back, list
        data = os.urandom(100_000)
        (m.path / f"after-{i}.bin").write_bytes(data)
        drop_page_cache(m.path / f"after-{i}.bin")
        assert (m.path / f"after-{i}.bin").read_bytes() == data
        assert m.proc is not None and m.proc.poll() is None
    s = admin(m, "stats")
    assert sum(t["restarts"] for t in s["tasks"].values()) == len(tasks), s["tasks"]
    assert all(t["restarts"] == 1 and "InjectedFault" in t["last_error"]
               for t in s["tasks"].values()), s["tasks"]
    # the restarted tasks do their work: uploads reach the mirror, the pull loop runs again
    drain(m)
    c = s3.client()
    for i in range(len(tasks)):
        key = f"after-{i}.bin"
        assert c.head_object(Bucket=s3.bucket, Key=key)["ContentLength"] == 100_000
    before = control(m, "stats")["pull"]["s3"]["last_pull"]
    m.wait_for(lambda: control(m, "stats")["pull"]["s3"]["last_pull"] > before, timeout=30)
    # every failure was logged once, with its traceback
    log = m.log_text()
    for name in tasks:
        assert log.count(f"task {name} failed unexpectedly") == 1, name
    assert log.count("InjectedFault: fault injected") == len(tasks)
    # and the human stats say so
    r = cli("stats", "-c", str(m.config))
    assert r.returncode == 0 and f"task restarts {len(tasks)}" in r.stdout, r.stdout
    r = cli("stats", "--prometheus", "-c", str(m.config))  # and the metrics
    for name in tasks:
        assert f'mirrorfs_task_restarts_total{{task="{name}"}} 1.0' in r.stdout, r.stdout
    assert m.umount() == 0


def test_test_seam_is_off_without_the_environment_variable(make_mount: Any) -> None:
    m = make_mount()
    with pytest.raises(RuntimeError, match="test-fail"):
        control(m, "test-fail", task="space")


# ---------------------------------------------------------------------- change-log records

LOG = ".mirrorfs/log/X/"
HOSTILE_PATHS = ["../escape", "/etc/passwd", "a//b", "./dot", "x/../../y", "dir/", "",
                 ".mirrorfs/log/A/000000000001-000000000001.jsonl", ".mirrorfs", "a\x00b",
                 "n" * 256, ".mirrorfs-tmp-1", "ok/.." + "/x" * 3000]
WRONG_VALUES = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.booleans(),
                         st.none(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _record(seq: int, path: str, data: bytes = b"", **over: Any) -> dict[str, Any]:
    rec = {"op": "put", "path": path, "hash": xxhash.xxh3_128_hexdigest(data),
           "prev": None, "size": len(data), "mtime": time.time_ns(), "mode": 0o644,
           "chunks": xxhash.xxh3_64_hexdigest(data), "seq": seq}
    rec.update(over)
    return rec


@st.composite
def bad_line(draw: st.DrawFn, seq: int, first: int, last: int) -> bytes:
    """One malformed record at position ``seq`` of an object ``first..last``."""
    base = _record(seq, f"bad/{seq}.bin")
    kind = draw(st.sampled_from(["truncated", "wrong type", "huge size", "bad mode",
                                 "unknown field", "hostile path", "not an object",
                                 "seq out of range", "chunks", "rename without from"]))
    if kind == "truncated":
        text = json.dumps(base)
        return text[:draw(st.integers(1, len(text) - 1))].encode()
    if kind == "wrong type":
        key = draw(st.sampled_from(["seq", "size", "mtime", "mode", "hash", "path", "op"]))
        value = draw(WRONG_VALUES.filter(lambda v: not isinstance(v, int) or
                                         isinstance(v, bool)))
        if key == "op" and value in ("put", "rename", "delete"):
            value = 1
        if key == "path" and isinstance(value, str):
            value = [value]  # a string may well be a good path
        base[key] = value
    elif kind == "huge size":
        base["size"] = draw(st.integers(min_value=(1 << 43) + 1, max_value=1 << 200))
    elif kind == "bad mode":
        base["mode"] = draw(st.one_of(st.integers(max_value=-1),
                                      st.integers(min_value=0o10000)))
    elif kind == "unknown field":
        base[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in base))] = 1
    elif kind == "hostile path":
        base["path"] = draw(st.sampled_from(HOSTILE_PATHS))
    elif kind == "not an object":
        return draw(st.sampled_from([b"[]", b"42", b"null", b'"put"', b"\xff\xfe\x00garbage",
                                     b"[" * 100_000, b"{" + b'"a":' * 50_000]))
    elif kind == "seq out of range":
        base["seq"] = draw(st.sampled_from([0, -1, first - 1, last + 1, 1 << 70]))
    elif kind == "chunks":
        base["chunks"] = draw(st.sampled_from(["", "00", "zz" * 8, "0" * 32]))
    else:
        base = {"op": "rename", **{k: base[k] for k in ("path", "hash", "size", "mtime",
                                                         "seq")}}
    return json.dumps(base).encode()


def test_parse_record_accepts_what_publishers_write_and_nothing_else() -> None:
    good = _record(5, "a/b.txt", b"hello")
    assert parse_record(json.dumps(good).encode(), 1, 9) == good
    ren = {"op": "rename", "path": "c.txt", "from": "a/b.txt", "hash": good["hash"],
           "size": 5, "mtime": 1, "mode": 0o600, "seq": 6}
    assert parse_record(json.dumps(ren).encode(), 1, 9) == ren
    for dele in ({"op": "delete", "path": "c.txt", "seq": 7, "hash": good["hash"]},
                 {"op": "delete", "path": "c.txt", "seq": 7}):
        assert parse_record(json.dumps(dele).encode(), 1, 9) == dele

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.data())
    def every_bad_line_is_refused(data: st.DataObject) -> None:
        line = data.draw(bad_line(5, 1, 9))
        with pytest.raises(BadRecord):
            parse_record(line, 1, 9)

    every_bad_line_is_refused()


def _put_log(c: Any, bucket: str, first: int, lines: list[bytes]) -> str:
    key = f"{LOG}{first:012d}-{first + len(lines) - 1:012d}.jsonl"
    c.put_object(Bucket=bucket, Key=key, Body=b"\n".join(lines) + b"\n")
    return key


def _problems(m: Mount, key: str) -> list[dict[str, Any]]:
    return [p for p in control(m, "problems") if p["object"] == key]


def test_malformed_change_log_records_are_quarantined_and_the_rest_applied(
        make_mount: Any, s3: Any) -> None:
    a = node(make_mount, s3, "A")
    b = node(make_mount, s3, "B")
    nodes = (a, b)
    for m in nodes:
        m.expect_log(r"quarantined")
    # Each node's first round lists the bucket (a listing pass): objects put before it ends
    # would be found by that pass, not by the records. Wait for a round after it.
    for m in nodes:
        first = m.wait_for(lambda m=m: control(m, "stats")["pull"]["shared"]["last_pull"],
                           timeout=30, interval=0.2)
        m.wait_for(lambda m=m, t=first: control(m, "stats")["pull"]["shared"]["last_pull"] > t,
                   timeout=30, interval=0.2)
    c = s3.client()
    seq = [1]
    good_files: dict[str, bytes] = {}
    bad_objects: dict[str, set[int]] = {}  # object key -> its bad line numbers
    examples = [0]

    def feed(lines: list[bytes | tuple[str, bytes]]) -> str:
        """Upload the objects of good records, then the change-log object; returns its key."""
        first = seq[0]
        out, bad = [], set()
        for i, item in enumerate(lines):
            if isinstance(item, tuple):
                path, data = item
                c.put_object(Bucket=s3.bucket, Key=path, Body=data)
                out.append(json.dumps(_record(first + i, path, data)).encode())
                good_files[path] = data
            else:
                out.append(item)
                bad.add(i + 1)
        key = _put_log(c, s3.bucket, first, out)
        seq[0] = first + len(lines)
        bad_objects[key] = bad
        return key

    def settled(key: str) -> None:
        for m in nodes:
            m.wait_for(lambda m=m: all(read_or_none(m.path / p) == d
                                       for p, d in good_files.items()), timeout=60,
                       interval=0.2)
            m.wait_for(lambda m=m: {p["line"] for p in _problems(m, key)} ==
                       bad_objects[key], timeout=60, interval=0.3)

    # A 100 MB change-log object between two good ones: quarantined whole, never read.
    feed([("big/before.bin", b"before")])
    big_first = seq[0]
    big_key = f"{LOG}{big_first:012d}-{big_first + 2:012d}.jsonl"
    c.put_object(Bucket=s3.bucket, Key=big_key, Body=b"{" + b" " * (100 * MiB))
    seq[0] = big_first + 3
    bad_objects[big_key] = {0}
    last = feed([("big/after.bin", b"after")])
    settled(big_key)
    settled(last)

    @settings(max_examples=int(os.environ.get("MIRRORFS_CHANGELOG_EXAMPLES", "4")),
              deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def hostile_batch(data: st.DataObject) -> None:
        n = examples[0] = examples[0] + 1
        count = data.draw(st.integers(6, 16))
        kinds = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
        kinds[0] = kinds[-1] = True  # good records around the bad ones
        kinds[1] = False
        lines: list[bytes | tuple[str, bytes]] = []
        first = seq[0]
        for i, good in enumerate(kinds):
            if good:
                lines.append((f"ex{n}/g{i}.bin", data.draw(st.binary(max_size=2000))))
            else:
                lines.append(data.draw(bad_line(first + i, first, first + count - 1)))
        key = feed(lines)
        # reads and writes go on meanwhile, and A's changes still reach B
        (a.path / f"from-a-{n}.txt").write_text(f"example {n}")
        settled(key)
        b.wait_for(lambda: read_or_none(b.path / f"from-a-{n}.txt") == f"example {n}".encode(),
                   timeout=60)

    hostile_batch()
    # another round of pulls lists nothing twice
    for m in nodes:
        admin(m, "pull")
        problems = admin(m, "problems")
        seen = [(p["object"], p["line"]) for p in problems]
        assert len(seen) == len(set(seen)), seen
        assert set(seen) == {(k, line) for k, lines in bad_objects.items() for line in lines}
        assert admin(m, "stats")["quarantined"] == len(seen)
        assert any(p["line"] == 0 and "cap" in p["problem"] for p in problems)
        for p, d in good_files.items():
            assert read_or_none(m.path / p) == d, p
        # nothing of the hostile records became a file
        assert sorted(x.name for x in m.path.iterdir() if x.name.startswith(("bad", "..",
                                                                           "escape"))) == []
        assert m.proc is not None and m.proc.poll() is None
    print(f"{examples[0]} hypothesis batches, {sum(map(len, bad_objects.values()))} bad "
          f"records quarantined, {len(good_files)} good ones applied on each node")
    r = cli("problems", "-c", str(a.config))
    assert r.returncode == 0 and big_key in r.stdout
    for m in nodes:
        assert m.umount() == 0


# ---------------------------------------------------------------------- full local disk


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A cache directory whose ``data`` (file contents) is a 32 MiB tmpfs; the registry
    stays on the roomy disk, so only the bytes run out of room."""
    cache = tmp_path / "m" / "cache"
    data = cache / "data"
    data.mkdir(parents=True, mode=0o700)
    with small_tmpfs(data, "32m"):
        yield cache


def _fill(path: Path) -> None:
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def test_enospc_during_a_download_is_a_local_disk_problem(
        make_mount: Any, s3: Any, small_data_dir: Path) -> None:
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, cache_dir=str(small_data_dir),
                   upload_delay=0, min_free=0)
    m.expect_log(r"local disk problem, not a mirror problem")
    data = os.urandom(12 * MiB)
    (m.path / "big.bin").write_bytes(data)
    drain(m)
    admin(m, "evict", str(m.path / "big.bin"))
    assert admin(m, "state", str(m.path / "big.bin"))["big.bin"]["state"] == "remote-only"
    filler = small_data_dir / "data" / "filler"
    _fill(filler)
    try:
        with pytest.raises(OSError) as info:
            drop_page_cache(m.path / "big.bin")
            (m.path / "big.bin").read_bytes()
        assert info.value.errno == errno.ENOSPC, info.value
        log = m.log_text()
        assert "local disk problem, not a mirror problem" in log
        assert "No space left on device" in log
        assert "no mirror has good bytes" not in log  # the mirror is not blamed
        assert m.proc is not None and m.proc.poll() is None
    finally:
        filler.unlink()
    # with room again, the same read works
    drop_page_cache(m.path / "big.bin")
    assert (m.path / "big.bin").read_bytes() == data
    assert m.umount() == 0


def test_failed_write_leaves_no_data_in_the_debug_log(
        make_mount: Any, tmp_path: Path, small_data_dir: Path) -> None:
    (tmp_path / "dm").mkdir()
    m = make_mount({"dir": {"type": "dir", "path": str(tmp_path / "dm")}},
                   cache_dir=str(small_data_dir), min_free=0, log_level="DEBUG", paused=True)
    m.expect_log(r"No space left|disk is full|ENOSPC")
    secret = (b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzz"
              + os.urandom(8).hex().encode())
    _fill(small_data_dir / "data" / "filler")
    with pytest.raises(OSError) as info:
        with open(m.path / "creds.env", "wb") as f:
            for _ in range(64):
                f.write(secret + b"\n" + secret * 100)
    assert info.value.errno == errno.ENOSPC
    with contextlib.suppress(OSError):  # setxattr values are data too
        os.setxattr(m.path, "user.token", secret)
    log = m.log_text()
    for needle in (secret, secret[:20], secret.hex().encode(), repr(secret)[2:30].encode()):
        assert needle.decode(errors="replace") not in log
    # the failure itself is logged, by operation and handle
    assert "write(fh=" in log or "flush(fh=" in log or "release(fh=" in log, \
        "the failed write was not logged at DEBUG"
    assert m.proc is not None and m.proc.poll() is None


# ---------------------------------------------------------------------- import


def test_import_skips_unreadable_keys_names_them_and_imports_the_rest(
        make_mount: Any, s3: Any) -> None:
    c = s3.client()
    good = {"ok/a.txt": b"a", "ok/b.txt": b"b" * 1000, "top.txt": b"top"}
    for k, v in good.items():
        c.put_object(Bucket=s3.bucket, Key=k, Body=v)
    long_key = "long/" + "/".join(["d" * 200] * 5) + "/f.txt"  # 1016+ bytes, parts < 256
    long_key += "x" * (1030 - len(long_key))
    c.put_object(Bucket=s3.bucket, Key=long_key, Body=b"too long for S3")
    req = urllib.request.Request(f"{s3.endpoint_url}/{s3.bucket}/bad%FFname.txt",
                                 data=b"not utf-8", method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    assert urllib.request.urlopen(req).status == 200
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    m.expect_log(r"cannot be read from the mirror")
    r = cli("import", "s3", "-c", str(m.config), "--json")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["added"] == len(good), out
    skipped = {s["key"] for s in out["skipped"]}
    assert skipped == {long_key, "bad\udcffname.txt"}, skipped
    for k, v in good.items():
        assert (m.path / k).read_bytes() == v
    # without --json: the same exit status, and each skipped key named on stderr
    r = cli("import", "s3", "-c", str(m.config))
    assert r.returncode == 1
    assert "bad\\xffname.txt" in r.stderr and long_key in r.stderr, r.stderr
    assert "1024" in r.stderr and "UTF-8" in r.stderr
    assert m.proc is not None and m.proc.poll() is None
    assert m.umount() == 0


def test_ftp_sizes_and_times_from_the_server_are_checked() -> None:
    """Unit check of the FTP reply parsers (SIZE, MLSD/MLST facts, MDTM): garbage is the
    mirror's error (RemoteError) or no time, never a ValueError out of a job or a read."""
    from mirrorfs.errors import RemoteError
    from mirrorfs.remotes.ftp import _mtime_ns, _size

    assert _size(" 123 ", "SIZE") == 123 and _size(0, "MLSD") == 0
    for bad in ("abc", "-1", "1.5", "²", "9" * 30, ""):
        with pytest.raises(RemoteError):
            _size(bad, "SIZE")
    assert _mtime_ns("20261399000000") is None and _mtime_ns("garbage") is None
    assert _mtime_ns("20260101000000") == 1767225600 * 10**9


def test_reprs_of_config_and_remotes_hold_no_secret(tmp_path: Path) -> None:
    from mirrorfs.config import load_config
    from mirrorfs.probe import open_remotes

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        f'cache_dir = "{tmp_path / "cache"}"\n'
        '[mirrors.s3]\ntype = "s3"\nbucket = "my-bucket"\naccess_key_id = "AKIDEXAMPLE"\n'
        'secret_access_key = "s3-secret-value-123"\n'
        '[mirrors.ftp]\ntype = "ftp"\nhost = "127.0.0.1"\nuser = "u"\n'
        'password = "ftp-secret-value-456"\n')
    cfg_path.chmod(0o600)
    cfg = load_config(str(cfg_path))
    remotes = open_remotes(cfg)
    text = repr(cfg) + repr(cfg.mirrors) + repr(remotes) + str(cfg.mirrors[0])
    assert "s3-secret-value-123" not in text and "ftp-secret-value-456" not in text, text
    assert "bucket" in repr(cfg.mirrors[0]) and "***" in repr(cfg.mirrors[0])


def test_supervisor_backoff_readiness_and_fatal_errors() -> None:
    """In-process unit check of the Supervisor (MockClock): restarts with doubling backoff,
    a task that fails before it is ready fails the start, a FatalError ends the nursery."""
    import trio
    import trio.testing

    from mirrorfs.errors import FatalError
    from mirrorfs.workers import Supervisor

    runs: list[float] = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise ValueError("bug")

    async def never_ready(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("cannot bind")

    async def fatal() -> None:
        await trio.sleep(1)
        raise FatalError("cache directory gone")

    async def main() -> None:
        async with trio.open_nursery() as n:
            sup = Supervisor(n)
            sup.start_soon("flaky", flaky)
            await trio.sleep(10)
            assert sup.tasks["flaky"].restarts == 3 and len(runs) == 4
            gaps = [round(b - a, 3) for a, b in itertools.pairwise(runs)]
            assert gaps == [0.1, 0.2, 0.4], gaps
            with pytest.raises(OSError, match="cannot bind"):
                await sup.start("control", never_ready)
            sup.start_soon("fatal", fatal)
            await trio.sleep(3600)
            raise AssertionError("the FatalError did not end the nursery")

    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert info.group_contains(FatalError)


# ---------------------------------------------------------------------- a bucket that vanishes


def test_a_vanished_bucket_is_a_mirror_down_and_its_queue_resumes(make_mount: Any,
                                                                  s3: Any) -> None:
    """A bucket deleted under a running mount (and recreated later: a provider outage, a
    migration, an operator's mistake) is a mirror that went away, not a property of each file:
    the files that meet it wait in the queue and reach the bucket once it is back, with no
    `retry`. (It used to mark each of them failed, with an ERROR per file, until someone ran
    `mirrorfs retry`.) At mount time a missing bucket stays a configuration error
    (tests/test_admin.py)."""
    m = make_mount({"s3": {"type": "s3", **s3.options()}}, upload_delay=0)
    m.expect_log(r"mirror s3 is unreachable \(.*does not exist\); its queue waits")
    c = s3.client()
    for key in s3_objects(s3):
        c.delete_object(Bucket=s3.bucket, Key=key)
    c.delete_bucket(Bucket=s3.bucket)
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(3)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    m.wait_for(lambda: admin(m, "stats")["mirrors"]["s3"]["up"] is False, timeout=60)
    c.create_bucket(Bucket=s3.bucket)
    r = admin(m, "drain", "--timeout", "120")
    assert r["drained"] and r["failed"] == 0, r
    assert s3_objects(s3) == files
