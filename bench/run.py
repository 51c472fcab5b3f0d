#!/usr/bin/env python3
"""Side-by-side benchmark: the bare disk, mirrorfs and ``rclone mount --vfs-cache-mode full``.

    .venv/bin/python bench/run.py [--quick] [--reps N] [--systems disk,mirrorfs,rclone] [--scaling]

Every system works on one fresh ext4 filesystem (a loop image in bench/work/, direct I/O to its
backing file): the bare-disk directory, mirrorfs's cache dir and rclone's cache dir. mirrorfs
and rclone mirror to the same loopback moto S3 server (its own process), each into its own
bucket, with the same write-back delay and cache bound; a fourth column, ``boto3``, is the
plain-client reference for the remote workloads (upload, streamed GET, copy + delete).

Systems alternate inside each repetition (disk, mirrorfs, rclone, boto3, then again), and
between two measurements every mirror is settled (its bucket holds what the tree holds), so one
system's background uploads do not load the next one's measurement. Ratios are taken per
repetition and their median reported; single figures drift with the machine's load.

It measures and reports; it never asserts a timing. Goals are marked met / not met with the
figure. Results: bench/results/<date>.md and latest.md (+ .json, ratio plots as PNG).
Cleans up (unmounts, kills what it started, detaches the loop device) on exit, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"
PIDFILE = WORK / "pids.json"
PY = sys.executable

MiB = 1 << 20
GiB = 1 << 30
UPLOAD_DELAY = 5.0  # mirrorfs upload_delay == rclone --vfs-write-back
QUIET_DELAY = 24 * 3600.0  # mirrorfs-quiet: nothing is uploaded while it is measured
CACHE_SIZE = "8G"  # mirrorfs cache_size == rclone --vfs-cache-max-size
ATTR_TIMEOUT = 5.0  # rclone --attr-timeout (rclone's own files may change behind it)
#: mirrorfs's attr_timeout: its default (the only writer of its names on the node; pulls and
#: imports invalidate what they change), as the ceiling's 300 s
MIRRORFS_ATTR_TIMEOUT = 300.0
CONCURRENCY = 4  # mirrorfs mirror concurrency == rclone --transfers (default 4) == boto3 threads
SMALL_SIZE = 4096
CREDS = {"access_key_id": "test", "secret_access_key": "test"}
REGION = "us-east-1"
SYSTEMS = ("disk", "ceiling", "mirrorfs-quiet", "mirrorfs", "rclone", "boto3")
#: the systems --systems may name (boto3 comes with any mirroring one)
CHOOSABLE = SYSTEMS[:-1]
#: the FUSE daemons whose CPU time is reported
DAEMONS = ("ceiling", "mirrorfs-quiet", "mirrorfs", "rclone")
#: installed packages tarred (sources only) at bench start for the real-client row
TAR_PACKAGES = ("botocore", "moto")
DASH = "\u2013"  # en dash, for ranges in the report


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    big: int  # the sequential files and the remote-only file
    small_files: int  # create + stat + list + delete
    drain_files: int  # small files drained to the bucket
    rename_files: int  # files in the renamed directory
    randread_s: int  # seconds of random reads


FULL = Sizes(big=GiB, small_files=10_000, drain_files=2_000, rename_files=1_000, randread_s=10)
QUICK = Sizes(big=256 * MiB, small_files=2_000, drain_files=500, rename_files=200, randread_s=3)


@dataclass(frozen=True)
class Goal:
    label: str
    threshold: float  # on the median per-repetition speed ratio system / reference
    system: str = "mirrorfs"
    ref: str = ""  # "": the metric's reference


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_better: bool
    ref: str  # the reference system for the first ratio column: disk or boto3
    goals: tuple[Goal, ...] = ()
    note: str = ""


SEQ_GOALS = (Goal(">= 0.9x disk", 0.9), Goal("issue-2: >= 0.6x disk", 0.6))


#: issue 19's goals for the small-file rows, against the ceiling and rclone
SF_GOALS = (Goal("quiet >= 0.9x ceiling", 0.9, "mirrorfs-quiet", "ceiling"),
            Goal("running >= 0.7x ceiling", 0.7, "mirrorfs", "ceiling"),
            Goal("running >= 1.5x rclone", 1.5, "mirrorfs", "rclone"))
#: daemon CPU per operation <= 1.5x the ceiling's: as a speed ratio, >= 1 / 1.5
CPU_GOALS = (Goal("quiet CPU <= 1.5x ceiling", 1 / 1.5, "mirrorfs-quiet", "ceiling"),
             Goal("running CPU <= 1.5x ceiling", 1 / 1.5, "mirrorfs", "ceiling"))


def sf_cpu_metrics(s: Sizes) -> list[Metric]:
    n = f"{s.small_files:,}"
    out = [Metric(f"{k}_cpu", f"daemon CPU per 1,000 {what} ({n} files)", "CPU s", False,
                  "ceiling", CPU_GOALS, "utime + stime of the daemon's process tree during "
                  "the phase") for k, what in (("sf_create", "creates"), ("sf_stat", "stats"),
                                             ("sf_list", "listed entries"),
                                             ("sf_delete", "deletes"))]
    out.append(Metric("sf_unit_cpu", f"daemon CPU per 1,000 files, whole unit ({n} files: "
                      "create, stat, list, delete, until the bucket is settled)", "CPU s", False,
                      "ceiling", (), "includes the uploads and deletes on the mirror"))
    return out


def rc_metrics(tar_files: int, packages: tuple[str, ...]) -> list[Metric]:
    what = f"a tarball of {tar_files:,} files" if tar_files else "a source tarball"
    goal = (Goal("running >= 0.8x ceiling", 0.8, "mirrorfs", "ceiling"),)
    return [
        Metric("rc_untar", f"real client: unpack {what} (tar xzf)", "s", False, "disk", goal,
               f"sources of the installed {', '.join(packages)}, tarred at bench start"),
        Metric("rc_git", "real client: git init && git add -A && git commit on it", "s", False,
               "disk", goal),
        Metric("rc_total", "real client: unpack + git, total", "s", False, "disk", goal),
        Metric("rc_cpu", "real client: daemon CPU for unpack + git", "CPU s", False,
               "ceiling", CPU_GOALS),
    ]


def metrics(s: Sizes, tar_files: int = 0,
            packages: tuple[str, ...] = TAR_PACKAGES) -> list[Metric]:
    big = human_size(s.big)
    d = f"{UPLOAD_DELAY:g} s"
    return [
        Metric("seqwrite_1m", f"sequential write {big}, 1 MiB blocks + fsync", "MB/s", True,
               "disk", SEQ_GOALS),
        Metric("seqwrite_4k", f"sequential write {big}, 4 KiB blocks + fsync", "MB/s", True,
               "disk", (Goal(">= 0.5x disk", 0.5),)),
        Metric("seqread_warm", f"sequential read {big}, 1 MiB, page cache warm", "MB/s", True,
               "disk", SEQ_GOALS),
        Metric("seqread_cold", f"sequential read {big}, 1 MiB, after drop_caches", "MB/s",
               True, "disk", SEQ_GOALS, "mirrorfs/rclone: file in their local cache"),
        Metric("randread_iops", "random 4 KiB reads, QD1, warm", "IOPS", True, "disk"),
        Metric("randread_lat", "random 4 KiB reads, QD1, warm: mean latency", "µs", False,
               "disk"),
        Metric("sf_create", f"create {s.small_files:,} files of 4 KiB", "files/s", True, "disk",
               (Goal(">= 0.3x disk", 0.3), *SF_GOALS)),
        Metric("sf_stat", f"stat {s.small_files:,} files", "stats/s", True, "disk", SF_GOALS),
        Metric("sf_list", f"list a directory of {s.small_files:,} files", "entries/s", True,
               "disk", SF_GOALS),
        Metric("sf_delete", f"delete {s.small_files:,} files", "files/s", True, "disk",
               SF_GOALS),
        *sf_cpu_metrics(s),
        *rc_metrics(tar_files, packages),
        Metric("remote_ttfb", f"cold read of a remote-only {big} file: first 1 MiB", "ms",
               False, "boto3", (), "boto3: streamed get_object"),
        Metric("remote_read", f"cold read of a remote-only {big} file: throughput", "MB/s",
               True, "boto3", (), "boto3: streamed get_object"),
        Metric("drain_big", f"drain one {big} file: close -> in bucket, minus {d} delay", "s",
               False, "boto3", (), "boto3: upload_file, default TransferConfig"),
        Metric("drain_small", f"drain {s.drain_files:,} files of 4 KiB: close of last -> in "
               f"bucket, minus {d} delay", "s", False, "boto3",
               (), f"boto3: put_object, {CONCURRENCY} threads"),
        Metric("rename_call", f"rename a directory of {s.rename_files:,} uploaded files: "
               "rename(2)", "ms", False, "boto3", (), "boto3: n/a"),
        Metric("rename_remote", f"rename a directory of {s.rename_files:,} uploaded files: "
               "until the bucket reflects it", "s", False, "boto3", (),
               f"boto3: copy_object + delete_object, {CONCURRENCY} threads"),
    ]


def human_size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


class NotAvailable(Exception):
    """This system cannot run this workload (yet); reported as such, never as a figure."""


Cell = float | str  # a figure, or why there is none


@dataclass
class Results:
    reps: int
    values: dict[str, dict[str, list[Cell]]] = field(default_factory=dict)
    perturbed: set[tuple[str, str, int]] = field(default_factory=set)

    def flag(self, metrics: list[str], system: str, rep: int) -> None:
        """Figures taken while another process dropped the caches: marked in the report."""
        self.perturbed.update((m, system, rep) for m in metrics)

    def put(self, metric: str, system: str, rep: int, value: Cell) -> None:
        row = self.values.setdefault(metric, {})
        cells = row.setdefault(system, ["not run"] * self.reps)
        cells[rep] = value

    def fail(self, keys: list[str], system: str, rep: int, why: str) -> None:
        for k in keys:
            cur = self.values.get(k, {}).get(system, ["not run"] * self.reps)[rep]
            if not isinstance(cur, float):
                self.put(k, system, rep, why)

    def cells(self, metric: str, system: str) -> list[Cell]:
        return self.values.get(metric, {}).get(system, [])


# --------------------------------------------------------------------------------------------
# Tools, machine, process bookkeeping
# --------------------------------------------------------------------------------------------

def ensure_tools() -> None:
    missing = [t for t in ("fio", "rclone") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: {', '.join(missing)} missing and not root to install them")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def run_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info(fs_note: str) -> dict[str, str]:
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    root = run_out(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "/"])
    try:
        import moto
        moto_v = moto.__version__
    except ImportError:
        moto_v = "?"
    try:
        import pyfuse3
        pyfuse3_v = getattr(pyfuse3, "__version__", "?")
    except ImportError:
        pyfuse3_v = "?"
    commit = run_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_out(["git", "-C", str(REPO), "status", "--porcelain", "--", "mirrorfs"])
    return {
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "root fs": root,
        "bench fs": fs_note,
        "python": platform.python_version(),
        "pyfuse3": str(pyfuse3_v),
        "libfuse": run_out(["fusermount3", "--version"]).replace("fusermount3 version: ", ""),
        "fio": run_out(["fio", "--version"]),
        "rclone": run_out(["rclone", "version"]).splitlines()[0] if shutil.which("rclone")
        else "missing",
        "moto": moto_v,
        "mirrorfs": f"{commit}{' + uncommitted changes in mirrorfs/' if dirty else ''}",
        "load average at start": " ".join(open("/proc/loadavg").read().split()[:3]),
    }


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants so far: every thread of each
    (a process's /proc/<pid>/stat sums its threads), plus the reaped children it waited for.
    A daemon that moves work to a helper process is charged for it."""
    tck = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, seconds)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
        stats[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]) / tck)
    if pid not in stats:
        raise RuntimeError(f"daemon pid {pid} is gone")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats[p][1]
        todo += [c for c, (pp, _) in stats.items() if pp == p]
    return total


def remember_pid(pid: int, what: str) -> None:
    pids = json.loads(PIDFILE.read_text()) if PIDFILE.exists() else {}
    pids[str(pid)] = what
    PIDFILE.write_text(json.dumps(pids))


def forget_pid(pid: int) -> None:
    if PIDFILE.exists():
        pids = json.loads(PIDFILE.read_text())
        pids.pop(str(pid), None)
        PIDFILE.write_text(json.dumps(pids))


def mounted_under(base: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if len(line.split()) > 1]
    b = str(base.resolve())
    return [p for p in points if p == b or p.startswith(b + "/")]


def is_mounted(path: Path) -> bool:
    return str(path.resolve()) in mounted_under(path)


def lazy_unmount(path: Path | str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], stderr=subprocess.DEVNULL,
                   check=False)
    if str(path) in mounted_under(Path(path)):
        subprocess.run(["umount", "-l", str(path)], stderr=subprocess.DEVNULL, check=False)


def clean_stale() -> None:
    """Leftovers of a run that was killed: our daemons (by the pids we wrote), mounts, loop."""
    if PIDFILE.exists():
        for pid, what in json.loads(PIDFILE.read_text()).items():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if what.encode() in cmdline:
                log(f"killing stale {what} (pid {pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        PIDFILE.unlink()
    for p in sorted(mounted_under(WORK), key=len, reverse=True):
        log(f"unmounting stale {p}")
        lazy_unmount(p)
    img = WORK / "disk.img"
    for line in run_out(["losetup", "-j", str(img)]).splitlines():
        subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


OWN_DROPS = [0]  # how many times this run wrote drop_caches


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    OWN_DROPS[0] += 1


def foreign_drops() -> int:
    """drop_caches writes by other processes (other engineers' tests) so far; they empty the
    page cache under a warm measurement, so warm figures are retried or flagged."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1]) - OWN_DROPS[0]
    return 0


@contextlib.contextmanager
def drop_guard() -> Iterator[list[bool]]:
    """``with drop_guard() as hit:`` -- ``hit[0]`` is True afterwards if someone else dropped
    the caches meanwhile."""
    hit = [False]
    d0 = foreign_drops()
    yield hit
    hit[0] = foreign_drops() != d0


def guarded(measure: Callable[[], Any], attempts: int = 3) -> tuple[Any, bool]:
    """Run ``measure`` until no foreign drop_caches happened during it (at most ``attempts``
    times); returns its result and whether the last one was still perturbed."""
    for _ in range(attempts):
        with drop_guard() as hit:
            out = measure()
        if not hit[0]:
            return out, False
        log("  another process dropped the caches during the measurement: again")
    return out, True


# --------------------------------------------------------------------------------------------
# The filesystem every system works on, and the S3 server
# --------------------------------------------------------------------------------------------

class LoopFs:
    """A fresh ext4 (with a journal, so no delayed inode reuse) on a sparse image."""

    def __init__(self, size: str = "24G") -> None:
        self.img = WORK / "disk.img"
        self.mnt = WORK / "fs"
        self.size = size
        self.dev = ""
        self.note = ""

    def start(self) -> Path:
        WORK.mkdir(exist_ok=True)
        self.img.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", self.size, str(self.img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(self.img)], check=True)
        try:
            self.dev = subprocess.run(["losetup", "--direct-io=on", "-f", "--show",
                                       str(self.img)], check=True, capture_output=True,
                                      text=True).stdout.strip()
            self.mnt.mkdir(exist_ok=True)
            subprocess.run(["mount", self.dev, str(self.mnt)], check=True)
            self.note = (f"fresh ext4 (journal) on a {self.size} loop image, direct I/O to a "
                         "file on the root fs")
            return self.mnt
        except subprocess.CalledProcessError as exc:
            self.stop()
            self.note = f"root fs directory (loop mount failed: {exc})"
            d = WORK / "plain"
            d.mkdir(exist_ok=True)
            return d

    def stop(self) -> None:
        if is_mounted(self.mnt):
            if subprocess.run(["umount", str(self.mnt)], check=False,
                              stderr=subprocess.DEVNULL).returncode:
                subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], check=False)
            self.dev = ""
        self.img.unlink(missing_ok=True)


MOTO_SCRIPT = """
import sys
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
s.stop()
"""


class Moto:
    """moto's ThreadedMotoServer in a process of its own, so it never shares our GIL."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""

    def start(self) -> None:
        logf = open(WORK / "moto.log", "w")  # the child owns it
        self.proc = subprocess.Popen([PY, "-c", MOTO_SCRIPT, "moto-bench"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=logf, start_new_session=True)
        logf.close()
        remember_pid(self.proc.pid, "moto-bench")
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"moto did not start: {(WORK / 'moto.log').read_text()[-2000:]}")
        self.endpoint = f"http://127.0.0.1:{port}"

    def client(self) -> Any:
        import boto3
        import botocore.config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=CREDS["access_key_id"],
                            aws_secret_access_key=CREDS["secret_access_key"],
                            config=botocore.config.Config(retries={"max_attempts": 10}))

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        forget_pid(self.proc.pid)
        self.proc = None


class Bucket:
    def __init__(self, moto: Moto, name: str) -> None:
        self.name = name
        self.s3 = moto.client()
        self.s3.create_bucket(Bucket=name)

    def size_of(self, key: str) -> int | None:
        try:
            return int(self.s3.head_object(Bucket=self.name, Key=key)["ContentLength"])
        except self.s3.exceptions.ClientError:
            return None

    def keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name,
                                                                     Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def delete_prefix(self, prefix: str) -> None:
        keys = self.keys(prefix)
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.name, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Seconds until ``pred()`` holds; raises TimeoutError after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timeout (> {timeout:.0f} s)")
        time.sleep(interval)
    return time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# The systems
# --------------------------------------------------------------------------------------------

class System:
    name = ""
    root: Path  # the tree the workloads work in
    bucket: Bucket | None = None
    local = True  # runs the local workloads
    remote = False  # mirrors to a bucket (runs the remote workloads)
    daemon_pid: int | None = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def key(self, rel: str) -> str:
        return rel

    def alive(self) -> None:
        pass

    def make_remote_only(self, rel: str) -> None:
        raise NotAvailable("not applicable")


class Disk(System):
    name = "disk"

    def __init__(self, fs: Path) -> None:
        self.root = fs / "disk"
        self.root.mkdir(exist_ok=True)


class Boto3Ref(System):
    """The plain-client reference for the remote workloads: no filesystem at all."""

    name = "boto3"
    local = False

    def __init__(self, fs: Path, moto: Moto) -> None:
        self.root = fs / "boto3"
        self.root.mkdir(exist_ok=True)
        self.bucket = Bucket(moto, "boto3-bench")
        self.endpoint = moto.endpoint


class Mirrorfs(System):
    """``mirrorfs``: uploads running (``upload_delay`` 5 s, as rclone's write-back);
    ``mirrorfs-quiet``: a day's delay, so nothing is uploaded while it is measured (a local-only
    system here: no remote workloads)."""

    name = "mirrorfs"
    remote = True

    def __init__(self, fs: Path, moto: Moto, name: str = "mirrorfs",
                 delay: float = UPLOAD_DELAY) -> None:
        self.name = name
        self.delay = delay
        self.remote = delay < 60
        self.cache = fs / f"{name}-cache"
        self.root = WORK / f"mnt-{name}"
        self.log = WORK / "logs" / f"{name}.log"
        self.log.unlink(missing_ok=True)  # one run, one log
        self.bucket = Bucket(moto, f"{name}-bench")
        self.bucket_name = self.bucket.name
        self.endpoint = moto.endpoint
        self.mount: Any = None
        self.mirror_note = ""
        self.evict_output = ""

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests.mountutil import Mount, write_config

        self.log.parent.mkdir(exist_ok=True)
        s3_ok = run_out([PY, "-c", "import mirrorfs.remotes.s3; print('ok')"]) == "ok"
        if s3_ok:
            mirror = {"type": "s3", "endpoint_url": self.endpoint, "bucket": self.bucket_name,
                      "region": REGION, "addressing_style": "path",
                      "concurrency": CONCURRENCY, **CREDS}
            self.mirror_note = "S3 mirror on moto"
        else:  # pragma: no cover - only while the S3 remote does not exist
            (WORK / "fs" / "dir-mirror").mkdir(exist_ok=True)
            mirror = {"type": "dir", "path": str(WORK / "fs" / "dir-mirror")}
            self.mirror_note = "dir mirror (the S3 remote is not importable)"
            self.remote = False
        conf = write_config(WORK / f"{self.name}.toml", {
            "cache_dir": str(self.cache), "cache_size": CACHE_SIZE,
            "upload_delay": self.delay, "attr_timeout": MIRRORFS_ATTR_TIMEOUT, "xattrs": False,
            "log_level": "INFO"}, {"bench": mirror})
        conf.chmod(0o600)
        self.mount = Mount(conf, self.root, self.log)
        self.mount.start(timeout=60)
        self.daemon_pid = self.mount.pid
        remember_pid(self.daemon_pid, "mirrorfs.cli")

    def alive(self) -> None:
        if self.mount is None or self.mount.proc is None or self.mount.proc.poll() is not None:
            raise RuntimeError("the mirrorfs daemon is not running")

    def stop(self) -> None:
        if self.mount is not None:
            pid = self.daemon_pid
            self.mount.close()
            if pid:
                forget_pid(pid)
            self.mount = None
        lazy_unmount(self.root)

    def evict_available(self) -> bool:
        r = subprocess.run([PY, "-m", "mirrorfs.cli", "evict", "--help"], cwd=REPO,
                           capture_output=True, check=False)
        return r.returncode == 0

    def make_remote_only(self, rel: str) -> None:
        if not self.evict_available():
            raise NotAvailable("not available: no `mirrorfs evict` yet")
        before = du(self.cache)
        r = subprocess.run([PY, "-m", "mirrorfs.cli", "evict", "--json", str(self.root / rel)],
                           cwd=REPO, capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"mirrorfs evict failed: {(r.stderr or r.stdout).strip()[-300:]}")
        self.evict_output = r.stdout.strip()
        freed = before - du(self.cache)
        log(f"mirrorfs evict freed {freed / MiB:.0f} MiB: {self.evict_output[:200]}")
        if freed < (self.root / rel).stat().st_size // 2:
            raise RuntimeError(f"mirrorfs evict freed only {freed} bytes of the cache dir")

    def warnings(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if " WARNING " in line or " ERROR " in line or line.startswith("Traceback")]


class DaemonProcess(System):
    """A FUSE daemon we start ourselves (ceiling, rclone): mount, check, unmount."""

    proc: subprocess.Popen[bytes] | None = None
    log: Path

    def spawn(self, cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(exist_ok=True)
        self.root.mkdir(exist_ok=True)
        logf = open(self.log, "ab")  # the child owns it
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=logf, start_new_session=True)
        logf.close()
        self.daemon_pid = self.proc.pid
        remember_pid(self.proc.pid, what)
        t0 = time.monotonic()
        while not is_mounted(self.root):
            if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount: "
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the {self.name} daemon is not running")

    def stop(self) -> None:
        if self.proc is not None:
            subprocess.run(["fusermount3", "-u", str(self.root)], check=False,
                           stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            forget_pid(self.proc.pid)
            self.proc = None
        lazy_unmount(self.root)


class Ceiling(DaemonProcess):
    """bench/ceiling.py: a pyfuse3 + trio passthrough of a directory on the same filesystem,
    what any design on our stack can reach."""

    name = "ceiling"

    def __init__(self, fs: Path) -> None:
        self.src = fs / "ceiling-src"
        self.src.mkdir(exist_ok=True)
        self.root = WORK / "mnt-ceiling"
        self.log = WORK / "logs" / "ceiling.log"
        self.log.unlink(missing_ok=True)

    def start(self) -> None:
        self.spawn([PY, str(BENCH / "ceiling.py"), str(self.src), str(self.root)], "ceiling.py")


class Rclone(DaemonProcess):
    name = "rclone"
    remote = True

    def __init__(self, fs: Path, moto: Moto) -> None:
        self.cache = fs / "rclone-cache"
        self.root = WORK / "mnt-rclone"
        self.log = WORK / "logs" / "rclone.log"
        self.log.unlink(missing_ok=True)
        self.conf = WORK / "rclone.conf"
        self.bucket = Bucket(moto, "rclone-bench")
        self.bucket_name = self.bucket.name
        self.endpoint = moto.endpoint

    def start(self) -> None:
        self.conf.write_text("[bench]\ntype = s3\nprovider = Other\n"
                             f"access_key_id = {CREDS['access_key_id']}\n"
                             f"secret_access_key = {CREDS['secret_access_key']}\n"
                             f"endpoint = {self.endpoint}\nregion = {REGION}\n"
                             "force_path_style = true\nno_head = true\n")
        self.conf.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        cmd = ["rclone", "mount", f"bench:{self.bucket_name}", str(self.root),
               "--config", str(self.conf), "--cache-dir", str(self.cache),
               "--vfs-cache-mode", "full", "--vfs-write-back", f"{UPLOAD_DELAY:g}s",
               "--vfs-cache-max-size", CACHE_SIZE, "--attr-timeout", f"{ATTR_TIMEOUT:g}s",
               "--transfers", str(CONCURRENCY), "--log-file", str(self.log),
               "--log-level", "NOTICE"]
        self.spawn(cmd, "rclone", env)

    def make_remote_only(self, rel: str) -> None:
        """rclone has no evict command: restart it on an empty cache (the file is uploaded)."""
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.start()


# --------------------------------------------------------------------------------------------
# Workers: every workload that touches a mount runs in a child process
# --------------------------------------------------------------------------------------------

def worker_main(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    now = time.perf_counter
    if kind.startswith("sc_"):
        import scaling  # bench/scaling.py (bench/ is sys.path[0] when run.py runs)

        return scaling.worker_main(kind, args)
    if kind == "smallfiles":
        import scaling

        d, n, pid = Path(args["dir"]), args["n"], args.get("pid")
        cpu: list[float] = []  # the daemon's CPU seconds around each phase

        def mark() -> None:
            if pid:
                cpu.append(tree_cpu(pid))

        mark()
        names, create = scaling.create_small_files(d, n, SMALL_SIZE)
        mark()
        t = now()
        for p in names:
            os.stat(p)
        stat = now() - t
        mark()
        t = now()
        with os.scandir(d) as it:
            listed = sum(1 for _ in it)
        lst = now() - t
        mark()
        t = now()
        for p in names:
            os.unlink(p)
        delete = now() - t
        mark()
        os.rmdir(d)
        out = {"sf_create": n / create, "sf_stat": n / stat, "sf_list": listed / lst,
               "sf_delete": n / delete, "listed": listed}
        if pid:
            ops = (n, n, max(listed, 1), n)
            for i, k in enumerate(("sf_create", "sf_stat", "sf_list", "sf_delete")):
                out[f"{k}_cpu"] = (cpu[i + 1] - cpu[i]) * 1000.0 / ops[i]
        return out
    if kind == "realclient":
        d = Path(args["dir"])
        d.mkdir()
        t = now()
        subprocess.run(["tar", "xzf", args["tarball"], "-C", str(d)], check=True)
        untar = now() - t
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
               "-c", "init.defaultBranch=main", "-c", "gc.auto=0"]
        t = now()
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "import"]):
            subprocess.run([*git, *cmd], cwd=d, check=True, stdout=subprocess.DEVNULL)
        return {"rc_untar": untar, "rc_git": now() - t}
    if kind == "makefiles":
        d, n = Path(args["dir"]), args["n"]
        data = os.urandom(SMALL_SIZE)
        d.mkdir()
        t = now()
        for i in range(n):
            fd = os.open(str(d / f"f{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
        return {"seconds": now() - t}
    if kind == "rename":
        t = now()
        os.rename(args["src"], args["dst"])
        return {"seconds": now() - t}
    if kind == "readfile":
        t = now()
        fd = os.open(args["path"], os.O_RDONLY)
        total = len(os.read(fd, MiB))
        ttfb = now() - t
        while True:
            n = len(os.read(fd, MiB))
            if not n:
                break
            total += n
        os.close(fd)
        return {"ttfb": ttfb, "seconds": now() - t, "bytes": total}
    import boto3
    import botocore.config

    s3 = boto3.client("s3", endpoint_url=args["endpoint"], region_name=REGION,
                      aws_access_key_id=CREDS["access_key_id"],
                      aws_secret_access_key=CREDS["secret_access_key"],
                      config=botocore.config.Config(max_pool_connections=16))
    bucket = args["bucket"]
    if kind == "upload":
        t = now()
        s3.upload_file(args["path"], bucket, args["key"])
        return {"seconds": now() - t}
    if kind == "get":
        t = now()
        body = s3.get_object(Bucket=bucket, Key=args["key"])["Body"]
        chunks = body.iter_chunks(MiB)
        total = len(next(chunks))
        ttfb = now() - t
        for c in chunks:
            total += len(c)
        return {"ttfb": ttfb, "seconds": now() - t, "bytes": total}
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(CONCURRENCY)
    if kind == "putmany":
        data = os.urandom(SMALL_SIZE)
        keys = [f"{args['prefix']}f{i:06d}" for i in range(args["n"])]
        t = now()
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=data), keys))
        return {"seconds": now() - t}
    if kind == "renameprefix":
        src, dst = args["src"], args["dst"]
        keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=src) for o in p.get("Contents", [])]

        def move(k: str) -> None:
            s3.copy_object(Bucket=bucket, Key=dst + k[len(src):],
                           CopySource={"Bucket": bucket, "Key": k})
            s3.delete_object(Bucket=bucket, Key=k)

        t = now()
        list(pool.map(move, keys))
        return {"seconds": now() - t, "n": len(keys)}
    raise SystemExit(f"unknown worker {kind}")


def worker(kind: str, timeout: float = 900, **args: Any) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([PY, __file__, "--worker", kind, json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"worker {kind} failed: {r.stderr.strip()[-400:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def fio(name: str, path: Path, rw: str, bs: str, size: int, **extra: str) -> dict[str, Any]:
    out = WORK / "fio.json"
    cmd = ["fio", f"--name={name}", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--ioengine=psync", "--iodepth=1", "--direct=0",
           "--fallocate=none", "--invalidate=0", "--output-format=json", f"--output={out}"]
    cmd += [f"--{k}={v}" for k, v in extra.items()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if r.returncode:
        raise RuntimeError(f"fio {name} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    job: dict[str, Any] = json.loads(out.read_text())["jobs"][0]
    return job


def fio_mbps(job: dict[str, Any], ddir: str) -> float:
    """Bytes over the job's runtime (which includes end_fsync), in MB/s."""
    return float(job[ddir]["io_bytes"]) / (job["job_runtime"] / 1000.0) / 1e6


def du(path: Path) -> int:
    """Bytes allocated under ``path``."""
    out = run_out(["du", "-s", "-B1", str(path)])
    return int(out.split()[0]) if out else 0


def rm_tree(path: Path) -> None:
    subprocess.run(["rm", "-rf", str(path)], check=False, timeout=900)


# --------------------------------------------------------------------------------------------
# Workloads. Each is one step for one system in one repetition; the runner alternates systems.
# --------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    sizes: Sizes
    results: Results
    moto: Moto
    systems: dict[str, System]
    settle_timeout: float = 600.0
    profile: bool = False
    profiles: list[Path] = field(default_factory=list)
    uploaded: dict[str, bool] = field(default_factory=dict)  # big file in the bucket, by system
    root: Path | None = None  # the loop filesystem every system works on
    tarball: Path | None = None  # the real client's source tarball
    tar_files: int = 0
    scale: Any = None  # scaling.ScaleSizes when the scaling part runs, else None
    scaling: Any = None  # its scaling.ScaleResults


def settle_gone(sys_: System, key: str, ctx: Ctx) -> None:
    if sys_.remote and sys_.bucket is not None:
        b = sys_.bucket
        wait_until(lambda: b.size_of(key) is None, ctx.settle_timeout, 0.25)


def settle_prefix_empty(sys_: System, prefix: str, ctx: Ctx) -> None:
    if sys_.remote and sys_.bucket is not None:
        b = sys_.bucket
        wait_until(lambda: not b.keys(prefix), ctx.settle_timeout, 0.5)


SEQ_KEYS = ["seqwrite_1m", "seqread_warm", "randread_iops", "randread_lat", "seqread_cold",
            "drain_big", "seqwrite_4k"]


def w_seq(ctx: Ctx, s: System, rep: int) -> None:
    """1 MiB write (+ drain for mirrors), warm read, random reads, cold read, 4 KiB write."""
    size, res = ctx.sizes.big, ctx.results
    path, path4k = s.root / "seq.dat", s.root / "seq4k.dat"
    if isinstance(s, Boto3Ref):
        path.unlink(missing_ok=True)
        fio("layout", path, "write", "1M", size, end_fsync="1")
        r = worker("upload", endpoint=s.endpoint, bucket=s.bucket.name if s.bucket else "",
                   path=str(path), key="seq.dat")
        res.put("drain_big", s.name, rep, r["seconds"])
        ctx.uploaded[s.name] = True
        return
    path.unlink(missing_ok=True)
    settle_gone(s, s.key("seq.dat"), ctx)
    with drop_guard() as hit:
        job = fio("seqwrite_1m", path, "write", "1M", size, end_fsync="1")
    closed = time.monotonic()
    res.put("seqwrite_1m", s.name, rep, fio_mbps(job, "write"))
    if hit[0]:
        res.flag(["seqwrite_1m"], s.name, rep)
    if s.remote and s.bucket is not None:
        b, key = s.bucket, s.key("seq.dat")
        try:
            wait_until(lambda: b.size_of(key) == size, ctx.settle_timeout, 0.1)
            res.put("drain_big", s.name, rep, time.monotonic() - closed - UPLOAD_DELAY)
            ctx.uploaded[s.name] = True
        except TimeoutError as exc:
            res.put("drain_big", s.name, rep, str(exc))

    def warm_read() -> dict[str, Any]:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm it
        return fio("seqread_warm", path, "read", "1M", size)

    job, bad = guarded(warm_read)
    res.put("seqread_warm", s.name, rep, fio_mbps(job, "read"))
    if bad:
        res.flag(["seqread_warm"], s.name, rep)

    def rand_read() -> dict[str, Any]:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        return fio("randread", path, "randread", "4k", size, time_based="1",
                   runtime=str(ctx.sizes.randread_s), randrepeat="0", norandommap="1")

    job, bad = guarded(rand_read)
    res.put("randread_iops", s.name, rep, float(job["read"]["iops"]))
    res.put("randread_lat", s.name, rep, float(job["read"]["lat_ns"]["mean"]) / 1000.0)
    if bad:
        res.flag(["randread_iops", "randread_lat"], s.name, rep)
    drop_caches()
    job = fio("seqread_cold", path, "read", "1M", size)
    res.put("seqread_cold", s.name, rep, fio_mbps(job, "read"))
    path4k.unlink(missing_ok=True)
    with drop_guard() as hit:
        job = fio("seqwrite_4k", path4k, "write", "4k", size, end_fsync="1")
    res.put("seqwrite_4k", s.name, rep, fio_mbps(job, "write"))
    if hit[0]:
        res.flag(["seqwrite_4k"], s.name, rep)
    path4k.unlink()  # before the upload delay ends: never uploaded
    settle_gone(s, s.key("seq4k.dat"), ctx)


REMOTE_READ_KEYS = ["remote_ttfb", "remote_read"]


def w_remote_read(ctx: Ctx, s: System, rep: int) -> None:
    """Cold read of the uploaded big file once it is remote-only; then remove it everywhere."""
    res, size = ctx.results, ctx.sizes.big
    try:
        if not ctx.uploaded.get(s.name):
            raise NotAvailable("skipped: the big file did not reach the bucket")
        if isinstance(s, Boto3Ref):
            drop_caches()
            r = worker("get", endpoint=s.endpoint, bucket=s.bucket.name if s.bucket else "",
                       key="seq.dat")
        else:
            s.make_remote_only("seq.dat")
            drop_caches()
            r = worker("readfile", path=str(s.root / "seq.dat"))
        if r["bytes"] != size:
            raise RuntimeError(f"read {r['bytes']} bytes, expected {size}")
        res.put("remote_ttfb", s.name, rep, r["ttfb"] * 1000.0)
        res.put("remote_read", s.name, rep, size / r["seconds"] / 1e6)
    finally:
        ctx.uploaded.pop(s.name, None)
        if isinstance(s, Boto3Ref):
            if s.bucket is not None:
                s.bucket.s3.delete_object(Bucket=s.bucket.name, Key="seq.dat")
            (s.root / "seq.dat").unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                (s.root / "seq.dat").unlink()
            settle_gone(s, s.key("seq.dat"), ctx)


SF_KEYS = ["sf_create", "sf_stat", "sf_list", "sf_delete"]
SF_CPU_KEYS = [f"{k}_cpu" for k in SF_KEYS] + ["sf_unit_cpu"]


def w_smallfiles(ctx: Ctx, s: System, rep: int) -> None:
    """Create, stat, list, delete in one worker; for a FUSE daemon also its CPU time per phase
    (read by the worker between phases) and over the whole unit until the bucket is settled."""
    n = ctx.sizes.small_files
    attempt = [0]
    pid = s.daemon_pid

    def once() -> dict[str, Any]:
        attempt[0] += 1
        d = f"sf-r{rep}-{attempt[0]}"
        c0 = tree_cpu(pid) if pid else 0.0
        r = worker("smallfiles", dir=str(s.root / d), n=n, pid=pid)
        settle_prefix_empty(s, s.key(d + "/"), ctx)
        if pid:
            r["sf_unit_cpu"] = (tree_cpu(pid) - c0) * 1000.0 / n
        if r["listed"] != n:
            raise RuntimeError(f"listed {r['listed']} entries, expected {n}")
        return r

    r, bad = guarded(once, attempts=2)
    keys = SF_KEYS + (SF_CPU_KEYS if pid else [])
    for k in keys:
        ctx.results.put(k, s.name, rep, r[k])
    if bad:
        ctx.results.flag(keys, s.name, rep)


RC_KEYS = ["rc_untar", "rc_git", "rc_total", "rc_cpu"]


def make_tarball(dest: Path, packages: tuple[str, ...] = TAR_PACKAGES) -> int:
    """A source tarball from installed packages (nothing downloaded): their files without
    __pycache__, gzipped; returns how many files it holds."""
    import importlib.util
    import tarfile

    dirs = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} is not installed")
        dirs.append(Path(next(iter(spec.submodule_search_locations))))
    tmp = dest.with_suffix(".part")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for d in dirs:
            tar.add(d, arcname=f"src/{d.name}",
                    filter=lambda ti: None if "__pycache__" in ti.name else ti)
    tmp.rename(dest)
    with tarfile.open(dest) as tar:
        return sum(1 for m in tar.getmembers() if m.isfile())


def w_realclient(ctx: Ctx, s: System, rep: int) -> None:
    """Unpack a source tarball, then git init/add/commit it: what a user tries first."""
    if ctx.tarball is None:
        raise NotAvailable("no tarball")
    d = f"rc-r{rep}"
    pid = s.daemon_pid
    try:
        c0 = tree_cpu(pid) if pid else 0.0
        r = worker("realclient", dir=str(s.root / d), tarball=str(ctx.tarball))
        if pid:
            ctx.results.put("rc_cpu", s.name, rep, tree_cpu(pid) - c0)
        for k in ("rc_untar", "rc_git"):
            ctx.results.put(k, s.name, rep, r[k])
        ctx.results.put("rc_total", s.name, rep, r["rc_untar"] + r["rc_git"])
    finally:
        rm_tree(s.root / d)
        settle_prefix_empty(s, s.key(d + "/"), ctx)


def w_drain_small(ctx: Ctx, s: System, rep: int) -> None:
    n, d = ctx.sizes.drain_files, f"drain-r{rep}"
    assert s.bucket is not None
    b = s.bucket
    try:
        if isinstance(s, Boto3Ref):
            r = worker("putmany", endpoint=s.endpoint, bucket=b.name, prefix=d + "/", n=n)
            ctx.results.put("drain_small", s.name, rep, r["seconds"])
            return
        worker("makefiles", dir=str(s.root / d), n=n)
        closed = time.monotonic()
        prefix = s.key(d + "/")
        try:
            wait_until(lambda: len(b.keys(prefix)) == n, ctx.settle_timeout, 0.25)
            ctx.results.put("drain_small", s.name, rep,
                            time.monotonic() - closed - UPLOAD_DELAY)
        except TimeoutError as exc:
            ctx.results.put("drain_small", s.name, rep, str(exc))
    finally:
        if isinstance(s, Boto3Ref):
            b.delete_prefix(d + "/")
        else:
            rm_tree(s.root / d)
            settle_prefix_empty(s, s.key(d + "/"), ctx)


RENAME_KEYS = ["rename_call", "rename_remote"]


def w_rename(ctx: Ctx, s: System, rep: int) -> None:
    n = ctx.sizes.rename_files
    src, dst = f"ren-r{rep}", f"ren-r{rep}-moved"
    assert s.bucket is not None
    b = s.bucket
    try:
        if isinstance(s, Boto3Ref):
            worker("putmany", endpoint=s.endpoint, bucket=b.name, prefix=src + "/", n=n)
            r = worker("renameprefix", endpoint=s.endpoint, bucket=b.name, src=src + "/",
                       dst=dst + "/")
            ctx.results.put("rename_call", s.name, rep, "n/a")
            ctx.results.put("rename_remote", s.name, rep, r["seconds"])
            return
        worker("makefiles", dir=str(s.root / src), n=n)
        ps, pd = s.key(src + "/"), s.key(dst + "/")
        wait_until(lambda: len(b.keys(ps)) == n, ctx.settle_timeout, 0.25)
        t0 = time.monotonic()
        try:
            r = worker("rename", src=str(s.root / src), dst=str(s.root / dst))
        except RuntimeError as exc:
            raise NotAvailable(f"rename failed: {str(exc)[-120:]}") from None
        ctx.results.put("rename_call", s.name, rep, r["seconds"] * 1000.0)
        try:
            wait_until(lambda: len(b.keys(pd)) == n and not b.keys(ps), ctx.settle_timeout,
                       0.25)
            ctx.results.put("rename_remote", s.name, rep, time.monotonic() - t0)
        except TimeoutError as exc:
            ctx.results.put("rename_remote", s.name, rep, str(exc))
    finally:
        if isinstance(s, Boto3Ref):
            b.delete_prefix(src + "/")
            b.delete_prefix(dst + "/")
        else:
            rm_tree(s.root / src)
            rm_tree(s.root / dst)
            settle_prefix_empty(s, s.key(src + "/"), ctx)
            settle_prefix_empty(s, s.key(dst + "/"), ctx)


@dataclass(frozen=True)
class Workload:
    name: str
    fn: Callable[[Ctx, System, int], None]
    keys: list[str]
    local: bool  # runs on disk / mirrorfs / rclone
    remote: bool  # runs on mirrorfs / rclone / boto3


WORKLOADS = [
    Workload("seq", w_seq, SEQ_KEYS, local=True, remote=True),
    Workload("remote_read", w_remote_read, REMOTE_READ_KEYS, local=False, remote=True),
    Workload("smallfiles", w_smallfiles, SF_KEYS + SF_CPU_KEYS, local=True, remote=False),
    Workload("realclient", w_realclient, RC_KEYS, local=True, remote=False),
    Workload("drain_small", w_drain_small, ["drain_small"], local=False, remote=True),
    Workload("rename", w_rename, RENAME_KEYS, local=False, remote=True),
]


def applies(w: Workload, s: System) -> bool:
    if isinstance(s, Boto3Ref):
        return w.remote
    if isinstance(s, Disk):
        return w.local
    return w.local or (w.remote and s.remote)


@contextlib.contextmanager
def profiled(ctx: Ctx, s: System, name: str) -> Iterator[None]:
    """With --profile: py-spy samples the mirrorfs daemon for the length of the step."""
    if not ctx.profile or not isinstance(s, Mirrorfs) or not s.daemon_pid:
        yield
        return
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    out = WORK / "profiles" / f"{name}.txt"
    out.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen([pyspy, "record", "--pid", str(s.daemon_pid), "--format", "raw",
                             "--rate", "250", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ctx.profiles.append(out)


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """Leaf functions and mirrorfs/pyfuse3 frames by share of samples, from py-spy's raw output
    (collapsed stacks: ``frame;frame;... count``)."""
    if not path.exists():
        return [f"{path.name}: no samples"]
    leaf: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
        for f in set(frames):
            if "mirrorfs/" in f or "pyfuse3" in f:
                incl[f] = incl.get(f, 0) + count
    if not total:
        return [f"{path.name}: no samples"]
    out = [f"{path.stem}: {total} samples"]
    out += [f"  leaf {100 * c / total:5.1f}%  {f}" for f, c in
            sorted(leaf.items(), key=lambda x: -x[1])[:top]]
    out += [f"  incl {100 * c / total:5.1f}%  {f}" for f, c in
            sorted(incl.items(), key=lambda x: -x[1])[:top]]
    return out


def run_step(ctx: Ctx, w: Workload, s: System, rep: int) -> None:
    t0 = time.monotonic()
    try:
        s.alive()
        with profiled(ctx, s, f"{s.name}-{w.name}-r{rep + 1}"):
            w.fn(ctx, s, rep)
        status = "ok"
    except NotAvailable as exc:
        ctx.results.fail(w.keys, s.name, rep, str(exc))
        status = str(exc)
    except Exception as exc:  # measured, reported, and the run goes on
        msg = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        ctx.results.fail(w.keys, s.name, rep, msg)
        status = msg
    if isinstance(s, Boto3Ref):
        keys = [k for k in w.keys if k not in SEQ_KEYS or k == "drain_big"]
    elif isinstance(s, Disk):
        keys = [k for k in w.keys if k != "drain_big"]
    else:
        keys = w.keys
    figs = ", ".join(f"{k}={fmt(ctx.results.cells(k, s.name)[rep])}" for k in keys
                     if ctx.results.cells(k, s.name))
    log(f"rep {rep + 1} {w.name:12s} {s.name:8s} {time.monotonic() - t0:6.1f}s {status}: {figs}")


def scaling_hook(ctx: Ctx) -> None:
    """The scaling part (issue 7; bench/scaling.py): create rate, ``stats`` latency and daemon
    memory with 1k..1M registered files (registries built directly in LMDB by
    tests/registry_builder), cold-read first byte vs a streamed GET at 1 MiB..1 GiB, and RSS
    while streaming a 2 GiB remote-only file. Its own mounts, one S3 bucket each on the same
    moto server; results in ``ctx.scaling``, reported in their own section."""
    if ctx.scale is None or ctx.root is None:
        return
    import scaling

    log(f"scaling: registered files {', '.join(scaling.label(n) for n in ctx.scale.registered)}"
        f"; cold reads {', '.join(human_size(n) for n in ctx.scale.cold)}; stream "
        f"{human_size(ctx.scale.stream)}")
    scaling.run(ctx, sys.modules[__name__], ctx.scale, ctx.root)  # sets ctx.scaling
    log(f"scaling: done in {ctx.scaling.seconds / 60:.1f} min"
        + (f", {len(ctx.scaling.errors)} failure(s)" if ctx.scaling.errors else ""))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def fmt(v: Cell | None) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def summary(cells: list[Cell], flagged: int = 0) -> str:
    nums = [c for c in cells if isinstance(c, float)]
    if not cells:
        return "—"
    if not nums:
        return str(next(c for c in cells))
    s = fmt(statistics.median(nums)) + ("†" * bool(flagged))
    if len(nums) > 1:
        s += f" ({fmt(min(nums))}{DASH}{fmt(max(nums))})"
    bad = len(cells) - len(nums)
    if bad:
        s += f" [{bad} failed: {next(c for c in cells if isinstance(c, str))}]"
    return s


def ratio(res: Results, m: Metric, a: str, b: str) -> tuple[float | None, list[float]]:
    """Median of per-repetition speed ratios a/b (> 1: a is faster), and the ratios."""
    ca, cb = res.cells(m.key, a), res.cells(m.key, b)
    rs = []
    for x, y in zip(ca, cb, strict=False):
        if isinstance(x, float) and isinstance(y, float) and x > 0 and y > 0:
            rs.append(x / y if m.higher_better else y / x)
    return (statistics.median(rs) if rs else None), rs


def fmt_ratio(r: float | None, rs: list[float]) -> str:
    if r is None:
        return "—"
    s = f"{r:.2f}x"
    if len(rs) > 1:
        s += f" ({min(rs):.2f}{DASH}{max(rs):.2f})"
    return s


def goal_ratio(res: Results, m: Metric, g: Goal) -> float | None:
    return ratio(res, m, g.system, g.ref or m.ref)[0]


def goal_lines(res: Results, ms: list[Metric]) -> list[str]:
    out = []
    for m in ms:
        for g in m.goals:
            r = goal_ratio(res, m, g)
            if r is None:
                out.append(f"- {m.title}: {g.label}: **no figure**")
            else:
                verdict = "met" if r >= g.threshold else "not met"
                out.append(f"- {m.title}: {g.label}: **{verdict}** ({r:.2f}x)")
    if not any(res.cells(m.key, "rclone") for m in ms):
        out.append("- mirrorfs >= rclone everywhere: **not compared** (rclone not run)")
        return out
    worse, better, none = [], [], []
    for m in ms:
        r, _ = ratio(res, m, "mirrorfs", "rclone")
        if r is None:
            if res.cells(m.key, "mirrorfs") and res.cells(m.key, "rclone"):
                none.append(m.title)
        elif r >= 1.0:
            better.append(f"{m.key} {r:.2f}x")
        else:
            worse.append(f"{m.title} ({r:.2f}x)")
    verdict = "met" if not worse and better else "not met"
    out.append(f"- mirrorfs >= rclone everywhere: **{verdict}**"
               + (f"; behind on: {'; '.join(worse)}" if worse else "")
               + (f"; no comparison for: {'; '.join(none)}" if none else ""))
    return out


def write_report(res: Results, ms: list[Metric], info: dict[str, str], args: argparse.Namespace,
                 notes: list[str], systems: list[str], elapsed: float,
                 profiles: list[str], scale: Any = None) -> Path:
    RESULTS.mkdir(exist_ok=True)
    only_scaling = args.only_scaling
    all_workloads = {w.name for w in WORKLOADS} | {"scaling"}
    partial = not only_scaling and (set(systems) < set(SYSTEMS)
                                    or args.wanted_workloads < all_workloads)
    stamp = (dt.date.today().isoformat() + ("-quick" if args.quick else "")
             + ("-profile" if args.profile else "") + ("-scaling" if only_scaling else "")
             + (time.strftime("-partial-%H%M") if partial else ""))
    # profiled figures are perturbed, partial runs lack columns: never the latest figures
    latest = not args.profile and not partial
    cols = [s for s in SYSTEMS if s in systems]
    lines = [f"# mirrorfs benchmark, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
             f"{' (--quick)' if args.quick else ''}"
             f"{' (scaling part only)' if only_scaling else ''}", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    if only_scaling:
        lines += [f"- benchmark time {elapsed / 60:.1f} min", ""]
    else:
        lines += [f"- **repetitions**: {res.reps}, systems alternating in the order "
                  f"{', '.join(cols)}; benchmark time {elapsed / 60:.1f} min", ""]
        lines += ["Each cell: median (min-max) over the repetitions. Ratios are speed ratios "
                  "(> 1: mirrorfs faster; for times, latencies and CPU seconds the inverse of "
                  "the time ratio), taken within each repetition, median (min-max) over "
                  "repetitions. The reference for the first ratio is the disk for local "
                  "workloads, plain boto3 for remote ones and the ceiling for CPU rows. "
                  "`ceiling`: bench/ceiling.py, a pyfuse3 + trio passthrough over the same disk "
                  "(writeback cache, no xattr handler, entry/attr timeouts 300 s, inline I/O). "
                  f"`mirrorfs-quiet`: mirrorfs with upload_delay {QUIET_DELAY:g} s (uploads "
                  f"quiet); `mirrorfs`: upload_delay {UPLOAD_DELAY:g} s (uploads running).", ""]
        pairs = [(a, b) for a, b in (("mirrorfs", "ceiling"), ("mirrorfs-quiet", "ceiling"),
                                     ("mirrorfs", "rclone")) if a in cols and b in cols]
        head = ["workload", "unit", *cols, "mirrorfs / reference",
                *[f"{a} / {b}" for a, b in pairs], "goal"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in ms:
            row = [m.title + (f" <br>*{m.note}*" if m.note else ""), m.unit]
            row += [summary(res.cells(m.key, c),
                            sum(1 for (k, sy, _) in res.perturbed if k == m.key and sy == c))
                    for c in cols]
            r1, rs1 = ratio(res, m, "mirrorfs", m.ref)
            row.append(fmt_ratio(r1, rs1) + (f" vs {m.ref}" if r1 is not None else ""))
            row += [fmt_ratio(*ratio(res, m, a, b)) for a, b in pairs]
            verdicts = []
            for x in m.goals:
                rg = goal_ratio(res, m, x)
                if rg is not None:
                    verdicts.append(f"{x.label}: {'met' if rg >= x.threshold else 'not met'}")
            row.append("; ".join(verdicts))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "## Goals", "", *goal_lines(res, ms)]
    if res.perturbed or notes:
        lines += ["", "## Notes", ""]
    if res.perturbed:
        lines.append(f"- †: {len(res.perturbed)} figure(s) were taken while another process "
                     "wrote /proc/sys/vm/drop_caches (seen in /proc/vmstat) even after retries; "
                     "warm figures with † may be low.")
    lines += [f"- {n}" for n in notes]
    lines.append("")
    pngs: list[Path] = []
    if scale is not None:
        import scaling

        section, pngs = scaling.report(scale, stamp, RESULTS)
    else:
        section = ["## Scaling", "", "Not measured in this run (`bench/run.py --scaling` runs "
                   "the scaling part alone; it is part of the default workloads).", ""]
    lines += section
    if profiles:
        lines += ["## Profiles of the mirrorfs daemon (py-spy)", "", "```", *profiles, "```", ""]
    png = None if only_scaling else plot(res, ms, RESULTS / f"{stamp}-ratios.png")
    if png:
        lines += ["## Ratios", "", f"![ratios]({png.name})", ""]
        pngs.append(png)
    text = "\n".join(lines)
    out = RESULTS / f"{stamp}.md"
    out.write_text(text)
    if latest:
        # <stamp>-scaling-x.png (full run) / <stamp>-x.png (stamp ending in -scaling): both
        # become latest-scaling-x.png
        to = "latest-scaling" if only_scaling else "latest"
        for old in RESULTS.glob("latest-scaling-*"):  # no stale plots or dumps
            old.unlink()
        for p in pngs:
            shutil.copyfile(p, RESULTS / p.name.replace(stamp, to, 1))
        latest_md = RESULTS / "latest.md"
        if only_scaling and latest_md.exists():
            # keep the last full figures; replace only their scaling section
            section_text = "\n".join(section).replace(f"]({stamp}-", f"]({to}-")
            section_text += f"\n*(Scaling section from the run `{out.name}`.)*\n"
            latest_md.write_text(splice_section(latest_md.read_text(), "## Scaling",
                                                section_text))
        else:
            latest_md.write_text(text.replace(f"]({stamp}-", f"]({to}-"))
    raw = {"info": info, "reps": res.reps, "sizes": vars(args.sizes), "values": res.values,
           "perturbed": sorted(res.perturbed), "notes": notes,
           "scaling": scale.as_json() if scale is not None else None}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
    return out


def splice_section(text: str, heading: str, section: str) -> str:
    """``text`` with its ``heading`` section (up to the next ``## `` heading) replaced by
    ``section``; appended if it has none."""
    lines = text.splitlines()
    try:
        a = lines.index(heading)
    except ValueError:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    b = next((i for i in range(a + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join([*lines[:a], *section.rstrip("\n").splitlines(), "", *lines[b:]]) + "\n"


def plot(res: Results, ms: list[Metric], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = []
    for m in ms:
        r1, _ = ratio(res, m, "mirrorfs", m.ref)
        r2, _ = ratio(res, m, "mirrorfs", "rclone")
        if r1 is not None or r2 is not None:
            rows.append((m, r1, r2))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    ys = list(range(len(rows)))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], [r1 or 0 for _, r1, _ in rows], h,
            label="mirrorfs / reference (disk or boto3)", color="#4c72b0")
    ax.barh([y + h / 2 for y in ys], [r2 or 0 for _, _, r2 in rows], h,
            label="mirrorfs / rclone", color="#dd8452")
    for y, (m, r1, r2) in zip(ys, rows, strict=True):
        for g in m.goals:
            ax.plot([g.threshold] * 2, [y - h, y], color="black", lw=1)
        for dy, r in ((-h / 2, r1), (h / 2, r2)):
            if r:
                ax.text(r, y + dy, f" {r:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{m.key} ({m.unit})" for m, _, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("speed ratio (log scale; > 1 = mirrorfs faster; black ticks = goals)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, smaller sizes")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick: 1)")
    p.add_argument("--systems", default=",".join(CHOOSABLE),
                   help="comma-separated subset of " + ",".join(CHOOSABLE) + " (boto3, the "
                        "remote reference, runs whenever mirrorfs or rclone does)")
    names = [w.name for w in WORKLOADS] + ["scaling"]
    p.add_argument("--workloads", default=",".join(names),
                   help="comma-separated subset of " + ",".join(names) + " (scaling alone "
                        "starts none of the side-by-side systems)")
    p.add_argument("--scaling", action="store_true",
                   help="only the scaling part (same as --workloads scaling)")
    p.add_argument("--scaling-sizes", metavar="N,N,...",
                   help="registered-file counts for the scaling part, e.g. 1k,10k,100k,1M "
                        "(default: 1k,10k,100k,1M; --quick: 1k,10k,100k)")
    p.add_argument("--profile", action="store_true",
                   help="sample the mirrorfs daemon with py-spy during its steps (perturbs the "
                        "figures; summaries go to the report)")
    p.add_argument("--small-files", type=int, metavar="N",
                   help="files in the small-file unit (default 10,000; --quick: 2,000)")
    p.add_argument("--tar-packages", default=",".join(TAR_PACKAGES), metavar="PKG,...",
                   help="installed packages whose sources make the real client's tarball "
                        "(default: %(default)s)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    a.sizes = QUICK if a.quick else FULL
    if a.small_files:
        a.sizes = dataclasses.replace(a.sizes, small_files=a.small_files)
    a.tar_packages = tuple(x.strip() for x in a.tar_packages.split(",") if x.strip())
    a.reps = a.reps or (1 if a.quick else 3)
    if a.scaling:
        a.workloads = "scaling"
    wanted = {w.strip() for w in a.workloads.split(",") if w.strip()}
    unknown = wanted - set(names)
    if unknown:
        p.error(f"unknown workloads {', '.join(sorted(unknown))}")
    a.wanted_workloads = wanted
    a.only_scaling = wanted == {"scaling"}
    a.scale = None
    if "scaling" in wanted:
        import scaling

        a.scale = scaling.QUICK_SCALE if a.quick else scaling.FULL_SCALE
        if a.scaling_sizes:
            try:
                counts = tuple(sorted({scaling.parse_count(x) for x in
                                       a.scaling_sizes.split(",") if x.strip()}))
            except ValueError:
                p.error(f"--scaling-sizes: not a list of counts: {a.scaling_sizes}")
            a.scale = dataclasses.replace(a.scale, registered=counts)
    return a


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> int:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker_main(args.worker[0], json.loads(args.worker[1]))))
        return 0
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop mount, drop_caches, FUSE)")
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(chosen) - set(CHOOSABLE)
    if unknown:
        sys.exit(f"bench: unknown systems {', '.join(sorted(unknown))}")
    wanted_workloads = args.wanted_workloads
    if args.only_scaling:
        chosen = []  # the scaling part runs its own mounts
    else:
        ensure_tools()
    WORK.mkdir(exist_ok=True)
    clean_stale()
    res = Results(args.reps)
    notes: list[str] = []
    t_start = time.monotonic()
    interrupted = False
    with contextlib.ExitStack() as stack, signals_as_interrupt():
        fs = LoopFs()
        stack.callback(fs.stop)
        root = fs.start()
        info = machine_info(fs.note)
        moto = Moto()
        stack.callback(moto.stop)
        moto.start()
        tarball, tar_files = None, 0
        if "realclient" in wanted_workloads and chosen:
            tarball = WORK / "realclient-src.tar.gz"
            tarball.unlink(missing_ok=True)
            tar_files = make_tarball(tarball, args.tar_packages)
            stack.callback(tarball.unlink, missing_ok=True)
            log(f"real client: {tarball.name}, {tar_files:,} files of "
                f"{', '.join(args.tar_packages)}")
        ms = metrics(args.sizes, tar_files, args.tar_packages)
        systems: dict[str, System] = {}
        if "disk" in chosen:
            systems["disk"] = Disk(root)
        if "ceiling" in chosen:
            systems["ceiling"] = Ceiling(root)
        if "mirrorfs-quiet" in chosen:
            systems["mirrorfs-quiet"] = Mirrorfs(root, moto, "mirrorfs-quiet", QUIET_DELAY)
        if "mirrorfs" in chosen:
            systems["mirrorfs"] = Mirrorfs(root, moto)
        if "rclone" in chosen:
            systems["rclone"] = Rclone(root, moto)
        if "mirrorfs" in chosen or "rclone" in chosen:
            systems["boto3"] = Boto3Ref(root, moto)
        for s in systems.values():
            stack.callback(s.stop)
            s.start()
            log(f"started {s.name} on {s.root}")
        mf = systems.get("mirrorfs")
        if isinstance(mf, Mirrorfs):
            notes.append(f"mirrorfs: {mf.mirror_note}, upload_delay {UPLOAD_DELAY:g} s, "
                         f"cache_size {CACHE_SIZE}, attr_timeout {MIRRORFS_ATTR_TIMEOUT:g} s, "
                         "xattrs off, "
                         f"mirror concurrency {CONCURRENCY}.")
            if not mf.evict_available():
                notes.append("mirrorfs: `mirrorfs evict` is not available yet, so the cold "
                             "read of a remote-only file is not measured for mirrorfs.")
        if "rclone" in systems:
            notes.append(f"rclone: `rclone mount --vfs-cache-mode full --vfs-write-back "
                         f"{UPLOAD_DELAY:g}s --vfs-cache-max-size {CACHE_SIZE} --attr-timeout "
                         f"{ATTR_TIMEOUT:g}s --transfers {CONCURRENCY}`, s3 provider Other, "
                         "no_head = true; its remote-only file: rclone restarted on an "
                         "emptied cache dir.")
        ctx = Ctx(args.sizes, res, moto, systems, profile=args.profile, root=root,
                  scale=args.scale, tarball=tarball, tar_files=tar_files)
        if args.profile:
            notes.insert(0, "**Profiled run** (py-spy sampling the mirrorfs daemon at 250 Hz): "
                            "mirrorfs figures are perturbed.")
        order = [systems[n] for n in SYSTEMS if n in systems]
        try:
            for rep in range(args.reps):
                for w in WORKLOADS:
                    if w.name not in wanted_workloads:
                        continue
                    for s in order:
                        if applies(w, s):
                            run_step(ctx, w, s, rep)
            scaling_hook(ctx)
        except KeyboardInterrupt:
            interrupted = True
            notes.insert(0, "**Interrupted**: the figures below are partial.")
            log("interrupted: cleaning up and writing a partial report")
        for s in systems.values():
            if s.daemon_pid:
                hwm = rss_peak(s.daemon_pid)
                if hwm:
                    notes.append(f"{s.name} daemon peak RSS (VmHWM): {hwm}.")
        for m in systems.values():
            if isinstance(m, Mirrorfs):
                warns = m.warnings()
                notes.append(f"{m.name} log: {len(warns)} WARNING/ERROR lines"
                             + (f", first: `{warns[0][:200]}`" if warns else "") + ".")
        if not args.only_scaling:
            notes.append("Sequential and random figures come from fio (psync, invalidate=0, "
                         "fallocate=none; write MB/s over the job runtime, which includes "
                         "end_fsync). Small-file, remote-read and rename figures come from a "
                         "Python worker process (never the process serving a mount).")
            notes.append("Drain times start at the close (the end of fio / the worker) and end "
                         "when the bucket holds every object with its size; the configured "
                         "delay is subtracted. The rename time starts just before rename(2) "
                         "and includes any upload delay the system applies.")
        info["load average at end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    elapsed = time.monotonic() - t_start
    profiles = [line for p in ctx.profiles for line in profile_summary(p)]
    out = write_report(res, ms, info, args, notes, list(systems), elapsed, profiles,
                       ctx.scaling)
    log(f"report: {out}")
    print(out.read_text())
    return 130 if interrupted else 0


def rss_peak(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB"
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
