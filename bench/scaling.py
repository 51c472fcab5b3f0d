"""The scaling part of the benchmark (issue 7), run from ``bench/run.py`` through its
``scaling_hook`` (``--scaling`` or ``--workloads scaling`` runs it alone).

1. **Registered files**: for each N (1k, 10k, 100k, 1M; quick: up to 100k) a registry is built
   directly in LMDB with ``tests/registry_builder.build`` (N remote-only files in directories
   of 1,000) and mounted with an S3 mirror on the loopback moto server. Every mount is up at
   the same time, and each measurement alternates over the sizes in turn: mount time (the
   first mount after building does the full startup check), creating a batch of small files
   through the mount (files/s, in a worker process), ``mirrorfs stats --json -c CONFIG`` wall
   time online, ``ls -l`` of up to ten directories of 1,000 files; then after unmounting,
   ``stats`` offline, and a clean remount.
2. **Cold reads**: files of 1 MiB, 64 MiB and 1 GiB written through a mount, drained to the
   bucket, then per repetition ``mirrorfs evict`` (checked to free the cache), drop_caches and
   a read in a worker, against a plain streamed ``get_object`` of the same object (also after
   drop_caches), alternating. Time to the first 4 KiB returned, to the first MiB, throughput.
3. **Memory**: the daemon's VmHWM, and peaks of RssAnon and RssFile sampled every 20 ms, (a)
   while holding N registered files (after mount, a ``stats``, ``ls -l`` of up to ten
   directories) and (b) while streaming a 2 GiB remote-only file through a freshly started
   daemon. LMDB's memory map counts as file-backed RSS, hence the split. Where a figure is
   over the goal, /proc/<pid>/smaps is summarised by mapping and ``py-spy dump`` taken.

Absolute figures drift with the machine's load: read the ratios (to the smallest registry, to
boto3). Nothing here asserts a timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
KiB_PER_MiB = 1024
RSS_GOAL_MIB = 200
STATS_GOAL_S = 1.0
SMALL = 4096
FIRST = 4096  # "first byte": the first read(2) of 4 KiB
DASH = "\u2013"  # en dash, for ranges


@dataclass(frozen=True)
class ScaleSizes:
    registered: tuple[int, ...]
    creates: int  # files created per batch
    create_reps: int
    stats_reps: int
    cold: tuple[int, ...]  # cold-read file sizes
    cold_reps: int
    stream: int  # the file streamed while sampling RSS


FULL_SCALE = ScaleSizes((1_000, 10_000, 100_000, 1_000_000), 1_000, 5, 5,
                        (MiB, 64 * MiB, GiB), 3, 2 * GiB)
QUICK_SCALE = ScaleSizes((1_000, 10_000, 100_000), 1_000, 3, 5, (MiB, 64 * MiB), 3,
                         512 * MiB)


def parse_count(s: str) -> int:
    s = s.strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def size_label(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


@dataclass
class ScaleResults:
    sizes: ScaleSizes
    build_s: dict[int, float] = field(default_factory=dict)
    db_mib: dict[int, float] = field(default_factory=dict)
    mount_first_s: dict[int, float] = field(default_factory=dict)
    check_first_s: dict[int, float] = field(default_factory=dict)
    mount_clean_s: dict[int, float] = field(default_factory=dict)
    check_clean_s: dict[int, float] = field(default_factory=dict)
    umount_s: dict[int, float] = field(default_factory=dict)
    create: dict[int, list[float]] = field(default_factory=dict)  # files/s per repetition
    stats_online: dict[int, list[float]] = field(default_factory=dict)  # seconds
    stats_offline: dict[int, list[float]] = field(default_factory=dict)
    cli_floor: list[float] = field(default_factory=list)  # `mirrorfs --help`, seconds
    ls: dict[int, list[float]] = field(default_factory=dict)  # [entries, seconds]
    mem_hold: dict[int, dict[str, int]] = field(default_factory=dict)  # KiB, first mount
    mem_clean: dict[int, dict[str, int]] = field(default_factory=dict)  # KiB, clean remount
    mem_end: dict[int, dict[str, int]] = field(default_factory=dict)  # KiB, before umount
    mem_local: dict[int, dict[str, int]] = field(default_factory=dict)  # KiB, N local files
    cold: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)
    smaps: dict[str, list[list[Any]]] = field(default_factory=dict)  # scenario -> mappings
    rollup: dict[str, dict[str, int]] = field(default_factory=dict)  # scenario -> KiB
    pyspy: dict[str, str] = field(default_factory=dict)  # scenario -> file name
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    perturbed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Workers (run in a child process through run.py's ``--worker``)
# --------------------------------------------------------------------------------------------

def create_small_files(d: Path, n: int, size: int) -> tuple[list[str], float]:
    """Create ``n`` files of ``size`` bytes in a new directory ``d``; (names, seconds)."""
    data = os.urandom(size)
    d.mkdir()
    names = [str(d / f"f{i:06d}") for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t = time.perf_counter()
    for p in names:
        fd = os.open(p, flags, 0o644)
        os.write(fd, data)
        os.close(fd)
    return names, time.perf_counter() - t


def worker_main(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    now = time.perf_counter
    if kind == "sc_create":
        _names, seconds = create_small_files(Path(args["dir"]), args["n"], SMALL)
        return {"seconds": seconds}
    if kind == "sc_write":
        size = args["size"]
        block = bytearray(os.urandom(MiB))
        t = now()
        with open(args["path"], "wb") as f:
            for i in range(size // MiB):
                block[:8] = i.to_bytes(8, "big")  # no two blocks alike
                f.write(block)
        return {"seconds": now() - t}
    if kind == "sc_read":
        t = now()
        fd = os.open(args["path"], os.O_RDONLY)
        total = len(os.read(fd, FIRST))
        first = now() - t
        while total < MiB:
            n = len(os.read(fd, MiB - total))
            if not n:
                break
            total += n
        mib = now() - t
        while True:
            n = len(os.read(fd, MiB))
            if not n:
                break
            total += n
        os.close(fd)
        return {"first": first, "mib": mib, "seconds": now() - t, "bytes": total}
    if kind == "sc_get":
        import boto3
        import botocore.config

        s3 = boto3.client("s3", endpoint_url=args["endpoint"], region_name=args["region"],
                          aws_access_key_id=args["key_id"], aws_secret_access_key=args["secret"],
                          config=botocore.config.Config(retries={"max_attempts": 10}))
        t = now()
        body = s3.get_object(Bucket=args["bucket"], Key=args["key"])["Body"]
        total = len(body.read(FIRST))
        first = now() - t
        while total < MiB:
            c = body.read(MiB - total)
            if not c:
                break
            total += len(c)
        mib = now() - t
        for c in body.iter_chunks(MiB):
            total += len(c)
        return {"first": first, "mib": mib, "seconds": now() - t, "bytes": total}
    raise SystemExit(f"unknown worker {kind}")


# --------------------------------------------------------------------------------------------
# /proc: status, sampling, smaps
# --------------------------------------------------------------------------------------------

MEM_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/<pid>/status, in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in MEM_KEYS:
                out[k] = int(v.split()[0])
    return out


class Sampler:
    """Samples a process's RSS every ``interval`` s in a thread; keeps the peaks of RssAnon
    and RssFile (the kernel only keeps a peak of their sum, VmHWM). ``on_over`` runs once, in
    the thread, when VmRSS first exceeds ``limit_kib``."""

    def __init__(self, pid: int, interval: float = 0.02, limit_kib: int = 0,
                 on_over: Any = None) -> None:
        self.pid = pid
        self.interval = interval
        self.limit = limit_kib
        self.on_over = on_over
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.last: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fired = False
        while not self._stop.is_set():
            st = proc_status(self.pid)
            if st:
                self.last = st
                self.samples += 1
                for k in self.peak:
                    self.peak[k] = max(self.peak[k], st.get(k, 0))
                if self.limit and not fired and st.get("VmRSS", 0) > self.limit and self.on_over:
                    fired = True
                    self.on_over()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def result(self) -> dict[str, int]:
        st = proc_status(self.pid) or self.last
        return {"VmHWM": st.get("VmHWM", 0), "VmRSS": st.get("VmRSS", 0),
                "RssAnon": st.get("RssAnon", 0), "RssFile": st.get("RssFile", 0),
                "peak_RssAnon": self.peak["RssAnon"], "peak_RssFile": self.peak["RssFile"],
                "samples": self.samples}


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_idle(pid: int, window: float = 0.5, busy_ticks: int = 3,
              timeout: float = 120.0) -> float:
    """Seconds until the process uses less than ``busy_ticks`` of CPU in ``window`` s (its
    background startup work is done); gives up after ``timeout``."""
    t0 = time.monotonic()
    last = cpu_ticks(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = cpu_ticks(pid)
        if now - last < busy_ticks:
            return max(0.0, time.monotonic() - t0 - window)
        last = now
    return time.monotonic() - t0


def make_local(cache_dir: str) -> int:
    """Turn every registered file of a registry_builder registry into a local (cached) file
    and mark the registry cleanly stopped, so the next mount does the quick startup check and
    loads an LRU of every file. The content files are not created: the scenario is only for
    memory (reading such a file would fail)."""
    import stat as stat_

    from mirrorfs.cache.db import LOCAL_FULL, Database, Inode, get_counter, set_counter
    from mirrorfs.mount import CLEAN_MARKER

    db = Database(f"{cache_dir}/meta")
    inodes, counters = db.db["inodes"], db.db["counters"]
    n = 0
    with db.begin(write=True) as txn:
        todo = []
        for k, v in txn.cursor(db=inodes):
            node = Inode.unpack(v)
            if stat_.S_ISREG(node.mode):
                node.local = LOCAL_FULL
                todo.append((bytes(k), node.pack()))
        for k, v in todo:
            txn.put(k, v, db=inodes)
        n = len(todo)
        set_counter(txn, counters, b"local_files", n)
        set_counter(txn, counters, b"local_bytes", get_counter(txn, counters, b"bytes"))
    db.flush()
    db.close()
    Path(cache_dir, CLEAN_MARKER).touch()
    return n


def smaps_by_mapping(pid: int, top: int = 8) -> list[list[Any]]:
    """[name, Rss KiB, Anonymous KiB] of the largest mappings (summed by name)."""
    acc: dict[str, list[int]] = {}
    name = "?"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":") or "-" in parts[0]:
            name = parts[5] if len(parts) > 5 else "[anon]"
            if name.startswith("/"):
                name = "/".join(Path(name).parts[-2:])
            acc.setdefault(name, [0, 0])
        elif parts[0] == "Rss:":
            acc[name][0] += int(parts[1])
        elif parts[0] == "Anonymous:":
            acc[name][1] += int(parts[1])
    rows = sorted(([n, r, a] for n, (r, a) in acc.items()), key=lambda x: -x[1])
    return rows[:top]


def smaps_rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k.strip()] = int(v.split()[0])
    return {k: v for k, v in out.items() if k in ("Rss", "Pss", "Pss_Anon", "Pss_File",
                                                  "Anonymous", "Private_Clean", "Shared_Clean",
                                                  "Private_Dirty")}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

class Scaling:
    def __init__(self, ctx: Any, h: Any, sizes: ScaleSizes, root: Path) -> None:
        self.ctx = ctx
        self.h = h  # the run.py module: its helpers (logging, drop_caches, workers, pids)
        self.ss = sizes
        self.base = root / "scale"
        self.res = ScaleResults(sizes)
        self.mounts: dict[str, Any] = {}  # name -> tests.mountutil.Mount
        self.confs: dict[str, Path] = {}
        self.buckets: dict[str, Any] = {}

    # ------------------------------------------------------------ helpers

    def log(self, msg: str) -> None:
        self.h.log(f"scaling: {msg}")

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(self.h.REPO))
        return subprocess.run([self.h.PY, "-m", "mirrorfs.cli", *args], cwd=self.h.REPO,
                              env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def config(self, name: str) -> Path:
        from tests.mountutil import write_config

        d = self.base / name
        bucket = self.h.Bucket(self.ctx.moto, f"scale-{name}".lower())
        self.buckets[name] = bucket
        mirror = {"type": "s3", "endpoint_url": self.ctx.moto.endpoint, "bucket": bucket.name,
                  "region": self.h.REGION, "addressing_style": "path", "concurrency": 4,
                  **self.h.CREDS}
        # upload_delay 3600: created files stay dirty, so no upload traffic runs under a
        # measurement; the cold-read files are drained explicitly.
        conf = write_config(d / "mirrorfs.toml", {
            "cache_dir": str(d / "cache"), "cache_size": "8G", "upload_delay": 3600.0,
            "attr_timeout": 5.0, "xattrs": False, "log_level": "INFO"},
            {"s3": mirror})  # "s3": the mirror name registry_builder registers under
        self.confs[name] = conf
        return conf

    def mountpoint(self, name: str) -> Path:
        return self.h.WORK / f"mnt-scale-{name}"

    def mount(self, name: str) -> float:
        from tests.mountutil import Mount

        conf = self.confs[name]
        m = Mount(conf, self.mountpoint(name), conf.parent / "mirrorfs.log")
        t0 = time.monotonic()
        m.start(timeout=600)
        secs = time.monotonic() - t0
        self.mounts[name] = m
        self.h.remember_pid(m.pid, "mirrorfs.cli")
        return secs

    def umount(self, name: str) -> float:
        m = self.mounts.pop(name, None)
        if m is None:
            return 0.0
        pid = m.pid
        t0 = time.monotonic()
        try:
            rc = m.umount(timeout=120)
            if rc:
                self.res.errors.append(f"{name}: the daemon exited with {rc} at unmount")
        except Exception as exc:
            self.res.errors.append(f"{name}: unmount failed ({exc}); killed")
            m.kill()
        self.h.forget_pid(pid)
        self.h.lazy_unmount(self.mountpoint(name))
        return time.monotonic() - t0

    def close_all(self) -> None:
        for name in list(self.mounts):
            self.umount(name)

    def startup_check(self, name: str) -> float:
        """The last 'startup check (...) took X s' of this mount's log."""
        log = self.confs[name].parent / "mirrorfs.log"
        found = None
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if "startup check" in line and " took " in line:
                    with contextlib.suppress(ValueError, IndexError):
                        found = float(line.split(" took ")[1].split("s")[0])
        return float("nan") if found is None else found

    def warnings(self, name: str) -> list[str]:
        log = self.confs[name].parent / "mirrorfs.log"
        with contextlib.suppress(OSError):
            return [line for line in log.read_text(errors="replace").splitlines()
                    if " WARNING " in line or " ERROR " in line or line.startswith("Traceback")]
        return []

    def stats(self, name: str) -> tuple[float, dict[str, Any]]:
        t0 = time.monotonic()
        r = self.cli("stats", "--json", "-c", str(self.confs[name]), timeout=120)
        secs = time.monotonic() - t0
        if r.returncode:
            raise RuntimeError(f"mirrorfs stats failed: {(r.stderr or r.stdout).strip()[-300:]}")
        return secs, json.loads(r.stdout)

    def pyspy_dump(self, pid: int, scenario: str) -> None:
        pyspy = shutil.which("py-spy") or str(Path(self.h.PY).parent / "py-spy")
        out = self.h.WORK / "profiles" / f"scaling-{scenario}-pyspy.txt"
        out.parent.mkdir(exist_ok=True)
        try:
            r = subprocess.run([pyspy, "dump", "--pid", str(pid), "--nonblocking"],
                               capture_output=True, text=True, timeout=60, check=False)
            out.write_text(r.stdout + r.stderr)
            self.res.pyspy[scenario] = str(out)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.res.pyspy[scenario] = f"py-spy dump failed: {exc}"

    def memory_snapshot(self, pid: int, scenario: str, kib: int) -> None:
        self.res.smaps[scenario] = smaps_by_mapping(pid)
        self.res.rollup[scenario] = smaps_rollup(pid)
        if kib > RSS_GOAL_MIB * KiB_PER_MiB and scenario not in self.res.pyspy:
            self.pyspy_dump(pid, scenario)

    # ------------------------------------------------------------ 1. registered files

    def build(self, n: int, name: str) -> None:
        d = self.base / name
        shutil.rmtree(d, ignore_errors=True)
        (d / "cache").mkdir(parents=True)
        self.config(name)
        env = dict(os.environ, PYTHONPATH=str(self.h.REPO))
        t0 = time.monotonic()
        r = subprocess.run([self.h.PY, "-c", "import sys\nfrom tests.registry_builder import "
                            "build\nbuild(sys.argv[1], int(sys.argv[2]))", str(d / "cache"),
                            str(n)], cwd=self.h.REPO, env=env, capture_output=True, text=True,
                           timeout=900, check=False)
        if r.returncode:
            raise RuntimeError(f"registry_builder failed: {r.stderr.strip()[-300:]}")
        secs, db_mib = time.monotonic() - t0, self.h.du(d / "cache" / "meta") / MiB
        self.log(f"built {n:,} files in {secs:.1f} s (LMDB {db_mib:.0f} MiB)")
        if name == f"n{label(n)}":
            self.res.build_s[n], self.res.db_mib[n] = secs, db_mib

    def hold(self, n: int, name: str, scenario: str) -> dict[str, int]:
        """Wait until the freshly mounted daemon is idle (its startup work in the background,
        e.g. loading the cache's LRU order), then a stats, then ls -l of up to ten directories
        of 1,000 registered files. Over the goal, a py-spy dump shows what the daemon does."""
        m = self.mounts[name]
        pid = m.pid
        with Sampler(pid, limit_kib=RSS_GOAL_MIB * KiB_PER_MiB,
                     on_over=lambda: self.pyspy_dump(pid, scenario)) as smp:
            settle = wait_idle(pid)
            self.stats(name)
            dirs = [str(self.mountpoint(name) / ("d%07d" % i))
                    for i in range(0, max(1, n // 1000), max(1, n // 1000 // 10))][:10]
            t0 = time.monotonic()
            r = subprocess.run(["ls", "-l", *dirs], capture_output=True, text=True,
                               timeout=600, check=False)
            secs = time.monotonic() - t0
        if r.returncode:
            raise RuntimeError(f"ls -l failed: {r.stderr.strip()[-300:]}")
        entries = sum(1 for line in r.stdout.splitlines() if line.startswith("-"))
        if name == f"n{label(n)}":
            self.res.ls[n] = [float(entries), secs]
        return {**smp.result(), "settle_ms": int(settle * 1000)}

    def hold_local(self) -> None:
        """The largest registry again, every file made local (cached) and the registry marked
        cleanly stopped: what the daemon holds in memory for a cache of N files."""
        n = max(self.ss.registered)
        name = f"local-{label(n)}"
        self.build(n, name)
        cache = self.base / name / "cache"
        env = dict(os.environ, PYTHONPATH=str(self.h.REPO))
        r = subprocess.run([self.h.PY, __file__, "--make-local", str(cache)], cwd=self.h.REPO,
                           env=env, capture_output=True, text=True, timeout=900, check=False)
        if r.returncode:
            raise RuntimeError(f"make-local failed: {r.stderr.strip()[-300:]}")
        secs = self.mount(name)
        mem = self.hold(n, name, name)
        mem["mount_ms"] = int(secs * 1000)
        self.res.mem_local[n] = mem
        self.memory_snapshot(self.mounts[name].pid, name, mem["VmHWM"])
        self.log(f"{label(n)} local files: mount {secs:.2f} s, busy {mem['settle_ms']} ms "
                 f"after; VmHWM {mem['VmHWM'] / 1024:.0f} MiB, RssAnon "
                 f"{mem['RssAnon'] / 1024:.0f} MiB, RssFile {mem['RssFile'] / 1024:.0f} MiB")
        self.umount(name)
        shutil.rmtree(self.base / name, ignore_errors=True)

    def registered(self) -> None:
        ss, res = self.ss, self.res
        sizes = list(ss.registered)
        for n in sizes:
            self.build(n, f"n{label(n)}")
        for n in sizes:
            name = f"n{label(n)}"
            res.mount_first_s[n] = self.mount(name)
            res.check_first_s[n] = self.startup_check(name)
            mem = self.hold(n, name, f"hold-{label(n)}")
            res.mem_hold[n] = mem
            self.memory_snapshot(self.mounts[name].pid, f"hold-{label(n)}", mem["VmHWM"])
            self.log(f"{label(n)}: first mount {res.mount_first_s[n]:.2f} s (startup check "
                     f"{res.check_first_s[n]:.2f} s); after stats + ls -l of "
                     f"{res.ls[n][0]:.0f} files: VmHWM {mem['VmHWM'] / 1024:.0f} MiB, "
                     f"RssAnon {mem['RssAnon'] / 1024:.0f} MiB, "
                     f"RssFile {mem['RssFile'] / 1024:.0f} MiB")
        expect = {n: n for n in sizes}
        for rep in range(ss.create_reps):
            order = sizes if rep % 2 == 0 else sizes[::-1]
            for n in order:
                name = f"n{label(n)}"
                d0 = self.h.foreign_drops()
                r = self.h.worker("sc_create", timeout=600,
                                  dir=str(self.mountpoint(name) / f"bench-create-{rep}"),
                                  n=ss.creates)
                if self.h.foreign_drops() != d0:
                    res.perturbed.append(f"create {label(n)} rep {rep + 1}")
                res.create.setdefault(n, []).append(ss.creates / r["seconds"])
                expect[n] += ss.creates
            self.log(f"create rep {rep + 1}: " + ", ".join(
                f"{label(n)} {res.create[n][-1]:,.0f}/s" for n in sizes))
        for _ in range(ss.stats_reps):
            t0 = time.monotonic()
            self.cli("--help", timeout=60)
            res.cli_floor.append(time.monotonic() - t0)
            for n in sizes:
                secs, st = self.stats(f"n{label(n)}")
                res.stats_online.setdefault(n, []).append(secs)
                if st.get("files") != expect[n] or not st.get("online"):
                    res.errors.append(f"stats online at {label(n)}: files {st.get('files')} "
                                      f"(expected {expect[n]}), online {st.get('online')}")
        self.log("stats online (median): " + ", ".join(
            f"{label(n)} {1000 * statistics.median(res.stats_online[n]):.0f} ms" for n in sizes))
        for n in sizes:
            name = f"n{label(n)}"
            pid = self.mounts[name].pid
            res.mem_end[n] = proc_status(pid)
            res.umount_s[n] = self.umount(name)
            for w in self.warnings(name)[:3]:
                res.notes.append(f"mirrorfs log at {label(n)}: `{w[:200]}`")
        for _ in range(ss.stats_reps):
            for n in sizes:
                secs, st = self.stats(f"n{label(n)}")
                res.stats_offline.setdefault(n, []).append(secs)
                if st.get("files") != expect[n] or st.get("online"):
                    res.errors.append(f"stats offline at {label(n)}: files {st.get('files')} "
                                      f"(expected {expect[n]}), online {st.get('online')}")
        self.log("stats offline (median): " + ", ".join(
            f"{label(n)} {1000 * statistics.median(res.stats_offline[n]):.0f} ms"
            for n in sizes))
        for n in sizes:  # a clean start: the quick startup check
            name = f"n{label(n)}"
            res.mount_clean_s[n] = self.mount(name)
            res.check_clean_s[n] = self.startup_check(name)
            mem = self.hold(n, name, f"clean-{label(n)}")
            res.mem_clean[n] = mem
            self.memory_snapshot(self.mounts[name].pid, f"clean-{label(n)}", mem["VmHWM"])
            self.umount(name)
            self.log(f"{label(n)}: clean remount {res.mount_clean_s[n]:.2f} s (check "
                     f"{res.check_clean_s[n]:.2f} s), VmHWM {mem['VmHWM'] / 1024:.0f} MiB, "
                     f"RssAnon {mem['RssAnon'] / 1024:.0f} MiB")
        for n in sizes:
            shutil.rmtree(self.base / f"n{label(n)}", ignore_errors=True)

    # ------------------------------------------------------------ 2. cold reads, 3. stream

    def evict(self, name: str, path: Path, size: int) -> None:
        cache = self.confs[name].parent / "cache"
        before = self.h.du(cache)
        out = ""
        for _ in range(50):  # a download that just finished may still hold the file busy
            r = self.cli("evict", "--json", "-c", str(self.confs[name]), str(path), timeout=120)
            if r.returncode:
                raise RuntimeError(f"mirrorfs evict failed: {(r.stderr or r.stdout)[-300:]}")
            out = r.stdout
            if json.loads(out).get("evicted") == 1:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"mirrorfs evict did not evict {path.name}: {out.strip()[-200:]}")
        freed = before - self.h.du(cache)
        if freed < size // 2:
            raise RuntimeError(f"mirrorfs evict freed only {freed} bytes for {path.name}")

    def get_args(self, name: str, key: str) -> dict[str, Any]:
        return {"endpoint": self.ctx.moto.endpoint, "region": self.h.REGION,
                "key_id": self.h.CREDS["access_key_id"],
                "secret": self.h.CREDS["secret_access_key"],
                "bucket": self.buckets[name].name, "key": key}

    def remote(self) -> None:
        ss, res, name = self.ss, self.res, "remote"
        d = self.base / name
        shutil.rmtree(d, ignore_errors=True)
        (d / "cache").mkdir(parents=True)
        self.config(name)
        self.mount(name)
        mnt = self.mountpoint(name)
        files = {s: f"cold-{s // MiB}m.bin" for s in ss.cold}
        stream_name = f"stream-{ss.stream // MiB}m.bin"
        todo = [*files.items(), (ss.stream, stream_name)]
        t0 = time.monotonic()
        for size, fname in todo:
            self.h.worker("sc_write", timeout=900, path=str(mnt / fname), size=size)
        r = self.cli("drain", "--json", "--timeout", "900", "-c", str(self.confs[name]),
                     timeout=960)
        if r.returncode or not json.loads(r.stdout).get("drained"):
            raise RuntimeError(f"mirrorfs drain: {(r.stdout + r.stderr).strip()[-300:]}")
        for size, fname in todo:
            got = self.buckets[name].size_of(fname)
            if got != size:
                raise RuntimeError(f"{fname}: bucket holds {got} bytes, expected {size}")
        self.log(f"wrote and drained {sum(s for s, _ in todo) / GiB:.1f} GiB in "
                 f"{time.monotonic() - t0:.0f} s")
        for size, fname in files.items():
            c = res.cold.setdefault(size, {})
            for rep in range(ss.cold_reps):
                def read_mirrorfs(fname: str = fname, size: int = size) -> dict[str, Any]:
                    self.evict(name, mnt / fname, size)
                    self.h.drop_caches()
                    return self.h.worker("sc_read", path=str(mnt / fname))

                def read_boto3(fname: str = fname) -> dict[str, Any]:
                    self.h.drop_caches()
                    return self.h.worker("sc_get", **self.get_args(name, fname))

                if rep % 2 == 0:  # alternate which goes first
                    rm, rb = read_mirrorfs(), read_boto3()
                else:
                    rb, rm = read_boto3(), read_mirrorfs()
                for who, r in (("mirrorfs", rm), ("boto3", rb)):
                    if r["bytes"] != size:
                        raise RuntimeError(f"{who} read {r['bytes']} bytes of {fname}")
                    c.setdefault(f"{who}_first", []).append(r["first"] * 1000)
                    c.setdefault(f"{who}_mib", []).append(r["mib"] * 1000)
                    c.setdefault(f"{who}_mbps", []).append(size / r["seconds"] / 1e6)
                self.log(f"cold {size_label(size)} rep {rep + 1}: first 4 KiB mirrorfs "
                         f"{rm['first'] * 1000:.1f} ms, boto3 {rb['first'] * 1000:.1f} ms; "
                         f"{size / rm['seconds'] / 1e6:.0f} vs {size / rb['seconds'] / 1e6:.0f}"
                         " MB/s")
        # 3b: a freshly started daemon streams the big remote-only file
        self.umount(name)
        self.mount(name)
        pid = self.mounts[name].pid
        self.evict(name, mnt / stream_name, ss.stream)
        self.h.drop_caches()
        base = proc_status(pid)
        scenario = f"stream-{size_label(ss.stream).replace(' ', '')}"
        with Sampler(pid, limit_kib=RSS_GOAL_MIB * KiB_PER_MiB,
                     on_over=lambda: self.pyspy_dump(pid, scenario)) as smp:
            r = self.h.worker("sc_read", timeout=900, path=str(mnt / stream_name))
            self.memory_snapshot(pid, scenario, 0)
        mem = smp.result()
        if r["bytes"] != ss.stream:
            raise RuntimeError(f"streamed {r['bytes']} bytes of {stream_name}")
        res.stream = {"size": ss.stream, "seconds": r["seconds"], "first_ms": r["first"] * 1000,
                      "mbps": ss.stream / r["seconds"] / 1e6, "before": base, **mem}
        self.log(f"streamed {size_label(ss.stream)} at {res.stream['mbps']:.0f} MB/s: VmHWM "
                 f"{mem['VmHWM'] / 1024:.0f} MiB, peak RssAnon {mem['peak_RssAnon'] / 1024:.0f}"
                 f" MiB, peak RssFile {mem['peak_RssFile'] / 1024:.0f} MiB")
        for w in self.warnings(name)[:3]:
            res.notes.append(f"mirrorfs log (remote mount): `{w[:200]}`")
        self.umount(name)
        self.buckets[name].delete_prefix("")
        shutil.rmtree(d, ignore_errors=True)


def run(ctx: Any, h: Any, sizes: ScaleSizes, root: Path) -> ScaleResults:
    """The whole scaling part; never raises for a failed scenario (it is reported)."""
    import sys

    if str(h.REPO) not in sys.path:
        sys.path.insert(0, str(h.REPO))
    sc = Scaling(ctx, h, sizes, root)
    ctx.scaling = sc.res  # an interrupted run still reports what it measured
    t0 = time.monotonic()
    try:
        for part in (sc.registered, sc.hold_local, sc.remote):
            try:
                part()
            except Exception as exc:
                msg = f"{part.__name__}: {type(exc).__name__}: {str(exc)[:300]}"
                sc.res.errors.append(msg)
                h.log(f"scaling: FAILED {msg}")
            finally:
                sc.close_all()
    finally:
        sc.close_all()
        sc.res.seconds = time.monotonic() - t0
    return sc.res


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]  # no NaN
    return statistics.median(xs) if xs else None


def cell(xs: list[float], fmt: Any, scale: float = 1.0) -> str:
    m = med(xs)
    if m is None:
        return "—"
    s = fmt(m * scale)
    if len(xs) > 1:
        s += f" ({fmt(min(xs) * scale)}{DASH}{fmt(max(xs) * scale)})"
    return s


def f0(v: float) -> str:
    return f"{v:,.0f}"


def f1(v: float) -> str:
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def f2(v: float) -> str:
    return f"{v:.2f}"


def mib(kib: int | None) -> str:
    return "—" if not kib else f"{kib / 1024:.0f}"


def rel_to_first(res: ScaleResults, series: dict[int, list[float]], n: int,
                 higher_better: bool) -> str:
    """Median over repetitions of the per-repetition ratio to the smallest registry."""
    sizes = [s for s in res.sizes.registered if s in series]
    if not sizes or n not in series or n == sizes[0]:
        return "1.00x" if sizes and n == sizes[0] else "—"
    a, b = series[n], series[sizes[0]]
    rs = [(x / y if higher_better else y / x) for x, y in zip(a, b, strict=False) if x and y]
    if not rs:
        return "—"
    return f"{statistics.median(rs):.2f}x" + (f" ({min(rs):.2f}{DASH}{max(rs):.2f})"
                                              if len(rs) > 1 else "")


def verdicts(res: ScaleResults) -> list[str]:
    out = []
    big = max(res.sizes.registered)
    on, off = med(res.stats_online.get(big, [])), med(res.stats_offline.get(big, []))
    what = f"stats on {label(big)} files" if big != 1_000_000 else "stats on 1M files"
    if big < 1_000_000:
        out.append(f"- stats on 1M files under 1 s: **not measured** (largest registry here: "
                   f"{label(big)}; online {fmt_s(on)}, offline {fmt_s(off)})")
    elif on is None or off is None:
        out.append(f"- {what} under 1 s: **no figure**")
    else:
        ok = on < STATS_GOAL_S and off < STATS_GOAL_S
        out.append(f"- {what} under 1 s: **{'met' if ok else 'not met'}** (online "
                   f"{fmt_s(on)}, offline {fmt_s(off)}; wall time of `mirrorfs stats --json`, "
                   f"median of {len(res.stats_online.get(big, []))})")
    hold = res.mem_hold.get(big)
    st = res.stream
    parts, ok_all, anon_ok = [], True, True
    if hold:
        ok = hold["VmHWM"] < RSS_GOAL_MIB * KiB_PER_MiB
        ok_all &= ok
        anon_ok &= hold["peak_RssAnon"] < RSS_GOAL_MIB * KiB_PER_MiB
        parts.append(f"holding {label(big)} files: VmHWM {mib(hold['VmHWM'])} MiB "
                     f"(RssAnon {mib(hold['RssAnon'])}, RssFile {mib(hold['RssFile'])})")
    else:
        ok_all = False
        parts.append(f"holding {label(big)} files: no figure")
    if st:
        ok = st["VmHWM"] < RSS_GOAL_MIB * KiB_PER_MiB
        ok_all &= ok
        anon_ok &= st["peak_RssAnon"] < RSS_GOAL_MIB * KiB_PER_MiB
        parts.append(f"streaming {size_label(st['size'])}: VmHWM {mib(st['VmHWM'])} MiB "
                     f"(peak RssAnon {mib(st['peak_RssAnon'])}, peak RssFile "
                     f"{mib(st['peak_RssFile'])})")
    else:
        ok_all = False
        parts.append("streaming: no figure")
    loc = res.mem_local.get(big)
    scope = "" if big >= 1_000_000 and st.get("size", 0) >= 2 * GiB else \
        " (not at the full sizes: 1M files / 2 GiB)"
    out.append(f"- RSS under {RSS_GOAL_MIB} MiB in both memory scenarios (VmHWM){scope}: "
               f"**{'met' if ok_all else 'not met'}**; " + "; ".join(parts)
               + (f". Anonymous memory alone (peak RssAnon): "
                  f"**{'under' if anon_ok else 'over'} {RSS_GOAL_MIB} MiB** in both."
                  if hold and st else "."))
    if loc:
        ok = loc["VmHWM"] < RSS_GOAL_MIB * KiB_PER_MiB
        anon = loc["peak_RssAnon"] < RSS_GOAL_MIB * KiB_PER_MiB
        out.append(f"- the same {label(big)} files all local (cached), not part of the goal's "
                   f"scenario: VmHWM {mib(loc['VmHWM'])} MiB (**{'under' if ok else 'over'} "
                   f"{RSS_GOAL_MIB} MiB**), peak RssAnon {mib(loc['peak_RssAnon'])} MiB "
                   f"(**{'under' if anon else 'over'}**), RssFile {mib(loc['RssFile'])} MiB")
    return out


def fmt_s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def report(res: ScaleResults, stamp: str, results_dir: Path) -> tuple[list[str], list[Path]]:
    """The report section (Markdown lines) and the files it links (PNGs, py-spy dumps)."""
    ss = res.sizes
    sizes = [n for n in ss.registered if n in res.build_s]
    L = ["## Scaling", "",
         f"Registries built with `tests/registry_builder.build` (N remote-only files in "
         f"directories of 1,000, registered on the S3 mirror, on the loop filesystem); each "
         f"mounted with an S3 mirror on moto, `upload_delay = 3600` (created files stay dirty: "
         f"no upload traffic under a measurement), `attr_timeout = 5`, xattrs off. All sizes "
         f"are mounted at once and every measurement alternates over them; ratios are to the "
         f"smallest registry within each round, median (min{DASH}max). Creates: {ss.creates:,} "
         f"files of 4 KiB per batch, {ss.create_reps} batches per size (new directory each, "
         f"worker process). `stats`: wall time of `mirrorfs stats --json -c CONFIG` "
         f"(a new Python process each time), median of {ss.stats_reps}; the "
         f"`mirrorfs --help` row is the floor of any CLI call. Scaling part: "
         f"{res.seconds / 60:.1f} min.", ""]
    if sizes:
        head = ["registered files", *[label(n) for n in sizes]]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def row(title: str, vals: list[str]) -> None:
            L.append("| " + " | ".join([title, *vals]) + " |")

        row("registry build, s (LMDB MiB)", [f"{res.build_s[n]:.1f} ({res.db_mib.get(n, 0):.0f})"
                                             for n in sizes])
        row("first mount after build, s (startup check: full)",
            [f"{res.mount_first_s[n]:.2f} ({res.check_first_s[n]:.2f})"
             if n in res.mount_first_s else "—" for n in sizes])
        row("clean remount, s (startup check)",
            [f"{res.mount_clean_s[n]:.2f} ({res.check_clean_s[n]:.2f})"
             if n in res.mount_clean_s else "—" for n in sizes])
        row(f"create {ss.creates:,} files, files/s", [cell(res.create.get(n, []), f0)
                                                     for n in sizes])
        row("  create rate / at smallest", [rel_to_first(res, res.create, n, True)
                                           for n in sizes])
        row("`stats` online, ms", [cell(res.stats_online.get(n, []), f0, 1000) for n in sizes])
        row("  stats speed / at smallest", [rel_to_first(res, res.stats_online, n, False)
                                           for n in sizes])
        row("`stats` offline, ms", [cell(res.stats_offline.get(n, []), f0, 1000)
                                    for n in sizes])
        row("`mirrorfs --help` (interpreter + imports: the floor of any CLI call), ms",
            [cell(res.cli_floor, f0, 1000)] * len(sizes))
        row("`ls -l` of up to 10 dirs: entries, ms",
            [f"{res.ls[n][0]:,.0f}, {res.ls[n][1] * 1000:.0f}" if n in res.ls else "—"
             for n in sizes])
        row("daemon busy after the mount returned (background startup work), ms",
            [f"{res.mem_hold[n]['settle_ms']:,}" if n in res.mem_hold else "—"
             for n in sizes])
        row("unmount, s", [f"{res.umount_s[n]:.2f}" if n in res.umount_s else "—"
                           for n in sizes])
        row("daemon after first mount + stats + ls: VmHWM / RssAnon / RssFile, MiB",
            [" / ".join(mib(res.mem_hold[n].get(k)) for k in ("VmHWM", "RssAnon", "RssFile"))
             if n in res.mem_hold else "—" for n in sizes])
        row("same after a clean remount, MiB",
            [" / ".join(mib(res.mem_clean[n].get(k)) for k in ("VmHWM", "RssAnon", "RssFile"))
             if n in res.mem_clean else "—" for n in sizes])
        row("same at the end (after creates and stats), MiB",
            [" / ".join(mib(res.mem_end[n].get(k)) for k in ("VmHWM", "RssAnon", "RssFile"))
             if n in res.mem_end else "—" for n in sizes])
        L.append("")
    if res.cold:
        L += [f"### Cold read of a remote-only file (S3 mirror on moto) vs a streamed "
              f"`get_object`, median (min{DASH}max) of {ss.cold_reps}", "",
              "mirrorfs: `mirrorfs evict` (checked to free the cache), drop_caches, open + "
              "read in a worker; boto3: drop_caches, `get_object` + streamed body read of the "
              "same object; which goes first alternates. Both are one streaming GET from byte "
              "0 (mirrorfs serves a byte once its 4 MiB chunk is verified). First 4 KiB: "
              "time from open / the GET call until the first 4 KiB "
              "read returns. Ratios per repetition, boto3 time / mirrorfs time (> 1: mirrorfs "
              "faster). moto reads the whole object before it answers a GET, so boto3's first "
              "byte grows with size too.", "",
              "| size | first 4 KiB mirrorfs, ms | first 4 KiB boto3, ms | ratio | first MiB "
              "mirrorfs, ms | first MiB boto3, ms | whole file mirrorfs, MB/s | whole file "
              "boto3, MB/s | throughput ratio |", "|" + "---|" * 9]
        for size, c in sorted(res.cold.items()):
            def ratio(a: str, b: str, inverse: bool, c: dict[str, list[float]] = c) -> str:
                rs = [(y / x if inverse else x / y) for x, y in
                      zip(c.get(a, []), c.get(b, []), strict=False) if x and y]
                if not rs:
                    return "—"
                return f"{statistics.median(rs):.2f}x" + (
                    f" ({min(rs):.2f}{DASH}{max(rs):.2f})" if len(rs) > 1 else "")

            L.append("| " + " | ".join([
                size_label(size), cell(c.get("mirrorfs_first", []), f1),
                cell(c.get("boto3_first", []), f1),
                ratio("mirrorfs_first", "boto3_first", True),
                cell(c.get("mirrorfs_mib", []), f1), cell(c.get("boto3_mib", []), f1),
                cell(c.get("mirrorfs_mbps", []), f0), cell(c.get("boto3_mbps", []), f0),
                ratio("mirrorfs_mbps", "boto3_mbps", False)]) + " |")
        L.append("")
    L += ["### Memory of the daemon", "",
          "VmHWM is the kernel's peak of the whole RSS. It counts file-backed pages: LMDB "
          "is a memory map, so every registry page the daemon has touched (clean page cache, "
          "reclaimable, shared with other readers) shows as RssFile. RssAnon is the Python "
          "heap and buffers. Peaks of RssAnon / RssFile sampled every 20 ms.", "",
          "| scenario | VmHWM, MiB | RssAnon peak, MiB | RssFile peak, MiB |",
          "|---|---|---|---|"]
    for n, mem in sorted(res.mem_hold.items()):
        L.append(f"| holding {label(n)} registered files (first mount, stats, ls -l) | "
                 f"{mib(mem['VmHWM'])} | {mib(mem['peak_RssAnon'])} | "
                 f"{mib(mem['peak_RssFile'])} |")
    for n, mem in sorted(res.mem_local.items()):
        L.append(f"| holding {label(n)} registered files, all **local** (cached; clean "
                 f"start, stats, ls -l) | {mib(mem['VmHWM'])} | {mib(mem['peak_RssAnon'])} | "
                 f"{mib(mem['peak_RssFile'])} |")
    st = res.stream
    if st:
        L.append(f"| streaming a remote-only {size_label(st['size'])} file (fresh daemon, "
                 f"{st['mbps']:.0f} MB/s) | {mib(st['VmHWM'])} | {mib(st['peak_RssAnon'])} | "
                 f"{mib(st['peak_RssFile'])} |")
    L.append("")
    big = label(max(ss.registered))
    show = [s for s in res.smaps if s in (f"hold-{big}", f"clean-{big}", f"local-{big}")
            or s.startswith("stream")]
    if show:
        L += ["Largest mappings (/proc/<pid>/smaps, Rss / Anonymous KiB) and smaps_rollup:",
              "", "```"]
        for s in show:
            roll = res.rollup.get(s, {})
            L.append(f"{s}: " + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in roll.items()))
            L += [f"  {r:>8,} {a:>8,}  {name}" for name, r, a in res.smaps[s]]
        L += ["```", ""]
    base = stamp if stamp.endswith("-scaling") else f"{stamp}-scaling"
    kept_files: list[Path] = []
    for s, p in res.pyspy.items():
        dump = Path(p)
        if dump.is_file():
            kept = results_dir / f"{base}-pyspy-{s}.txt"
            shutil.copyfile(dump, kept)
            kept_files.append(kept)
            L.append(f"- `py-spy dump` of the daemon ({s}, VmRSS over {RSS_GOAL_MIB} MiB): "
                     f"[{kept.name}]({kept.name})")
        else:
            L.append(f"- py-spy dump ({s}): {p}")
    if res.pyspy:
        L.append("")
    L += ["", "### Goals", "", *verdicts(res), ""]
    if res.errors or res.notes or res.perturbed:
        L += ["### Notes", ""]
        L += [f"- **failed**: {e}" for e in res.errors]
        L += [f"- {n}" for n in res.notes]
        if res.perturbed:
            L.append(f"- another process dropped the caches during: {', '.join(res.perturbed)}")
        L.append("")
    pngs = plot(res, stamp, results_dir)
    if pngs:
        L += ["### Plots", ""] + [f"![scaling: {p.stem.rsplit('-', 1)[1]}]({p.name})"
                                  for p in pngs] + [""]
    return L, pngs + kept_files


def plot(res: ScaleResults, stamp: str, results_dir: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out: list[Path] = []

    def series(d: dict[int, list[float]], scale: float = 1.0) -> tuple[list[int], list[float],
                                                                        list[list[float]]]:
        xs = sorted(k for k, v in d.items() if med(v) is not None)
        ys = [med(d[x]) * scale for x in xs]  # type: ignore[operator]
        err = [[y - min(d[x]) * scale for x, y in zip(xs, ys, strict=True)],
               [max(d[x]) * scale - y for x, y in zip(xs, ys, strict=True)]]
        return xs, ys, err

    base = stamp if stamp.endswith("-scaling") else f"{stamp}-scaling"

    def save(fig: Any, name: str) -> None:
        p = results_dir / f"{base}-{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(p)

    if res.create:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs, ys, err = series(res.create)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="mirrorfs")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("registered files")
        ax.set_ylabel(f"creates/s ({res.sizes.creates:,} files of 4 KiB)")
        ax.set_title("small-file create rate vs registered files")
        ax.grid(alpha=0.3)
        save(fig, "create")
    if res.stats_online:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for d, lab in ((res.stats_online, "stats online (daemon)"),
                       (res.stats_offline, "stats offline (LMDB)")):
            if d:
                xs, ys, err = series(d, 1000)
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=lab)
        if res.cli_floor:
            ax.axhline(med(res.cli_floor) * 1000, color="gray", ls=":",  # type: ignore[operator]
                       label="`mirrorfs --help` (CLI floor)")
        ax.axhline(STATS_GOAL_S * 1000, color="red", ls="--", lw=1, label="goal: 1 s")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("registered files")
        ax.set_ylabel("wall time of `mirrorfs stats --json`, ms")
        ax.set_title("stats latency vs registered files")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "stats")
    if res.cold:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for who, color in (("mirrorfs", "#4c72b0"), ("boto3", "#dd8452")):
            for what, ls, lab in (("first", "-", "first 4 KiB"), ("mib", "--", "first MiB")):
                d = {s: c.get(f"{who}_{what}", []) for s, c in res.cold.items()}
                xs, ys, err = series(d)
                ax.errorbar([x / MiB for x in xs], ys, yerr=err, marker="o", capsize=3,
                            color=color, ls=ls, label=f"{who}: {lab}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("file size, MiB")
        ax.set_ylabel("ms after open / GET (log)")
        ax.set_title("cold read: time to first byte vs file size")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        save(fig, "ttfb")
    if res.mem_hold:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = sorted(res.mem_hold)
        for k, lab in (("VmHWM", "VmHWM (peak RSS)"), ("peak_RssAnon", "RssAnon peak"),
                       ("peak_RssFile", "RssFile peak (LMDB map)")):
            ax.plot(xs, [res.mem_hold[x][k] / 1024 for x in xs], marker="o", label=lab)
        for n, mem in res.mem_local.items():
            ax.plot([n], [mem["VmHWM"] / 1024], marker="s", ls="", color="C0",
                    label=f"VmHWM, {label(n)} files all local")
            ax.plot([n], [mem["peak_RssAnon"] / 1024], marker="s", ls="", color="C1",
                    label=f"RssAnon, {label(n)} files all local")
        if res.stream:
            ax.axhline(res.stream["VmHWM"] / 1024, color="purple", ls=":",
                       label=f"VmHWM streaming {size_label(res.stream['size'])}")
        ax.axhline(RSS_GOAL_MIB, color="red", ls="--", lw=1, label=f"goal: {RSS_GOAL_MIB} MiB")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("registered files")
        ax.set_ylabel("MiB")
        ax.set_title("daemon memory holding N files (after mount, stats, ls -l)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "rss")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--make-local":
        print(make_local(sys.argv[2]))
    else:
        sys.exit("usage: scaling.py --make-local CACHE_DIR (the benchmark is bench/run.py)")
