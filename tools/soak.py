#!/usr/bin/env python3
"""Soak test: a mixed workload on a real mirrorfs mount for N minutes (not run in CI).

    sudo .venv/bin/python tools/soak.py 30            # 30 minutes, 16 processes
    sudo .venv/bin/python tools/soak.py 120 --procs 8 --seed 1234 --workdir /var/tmp/soak

Starts loopback mirrors (moto for S3, pyftpdlib for FTP, a directory), mounts mirrorfs with a
short upload delay and a small cache bound (so uploads, evictions and downloads run all the
time), and runs the workload of tests/test_concurrency.py: processes writing, replacing by
rename, appending, truncating, renaming, deleting and reading 40 overlapping files, each
read checked against what the file's last writer left. Every ``--report-every`` seconds it
prints operations done, errors, the daemon's RSS (anonymous + file-backed, the registry's
mapped pages) and the mirrors' queues; at the end it
drains and checks that every file holds what its last writer wrote and that every mirror
equals the local tree. Exit status 0 if all of that held, 1 if not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mountutil import Mount, write_config  # noqa: E402
from tests.servers import MotoS3, PyFtpd  # noqa: E402
from tests.servers import bucket_objects as s3_objects  # noqa: E402
from tests.test_concurrency import (  # noqa: E402
    DIRS,
    NAMES,
    digest_of,
    expected,
    run_workers,
    wait_all,
)

MiB = 1 << 20


def admin(m: Mount, *args: str) -> Any:
    r = subprocess.run([sys.executable, "-m", "mirrorfs.cli", *args, "-c", str(m.config),
                        "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    if r.returncode:
        raise RuntimeError(f"mirrorfs {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def rss_mib(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident memory: the registry's pages are mapped from
    data.mdb and count as file-backed; a leak shows in the anonymous part."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out.get("RssAnon", 0.0), out.get("RssFile", 0.0)


def files_below(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not f.startswith(".mirrorfs-") and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def progress(state: Path) -> tuple[int, int]:
    """(operations recorded, error lines) so far, from the workers' files."""
    ops = sum(p.read_bytes().count(b"\n") for p in state.glob("log.*"))
    errors = sum(p.read_text().count("\n") for p in state.glob("errors.*"))
    return ops, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("minutes", type=float)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", help="keep everything here (default: a temp dir, removed "
                    "if the run passes)")
    ap.add_argument("--report-every", type=float, default=30.0)
    ap.add_argument("--cache-size", default="2M", help="cache bound (small: evictions)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (FUSE mounts, like the tests)", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mirrorfs-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.minutes} min, {args.procs} processes, seed {seed}, in {work}",
          flush=True)
    ok = False
    with MotoS3(bucket="soak") as s3, PyFtpd(work / "ftp-root") as ftp:
        (work / "dm").mkdir(exist_ok=True)
        cfg = write_config(work / "mirrorfs.toml",
                           {"cache_dir": str(work / "cache"), "upload_delay": 0.05,
                            "cache_size": args.cache_size, "min_free": 0,
                            "log_level": "INFO"},
                           {"s3": {"type": "s3", **s3.options()},
                            "ftp": {"type": "ftp", **ftp.options()},
                            "dir": {"type": "dir", "path": str(work / "dm")}})
        m = Mount(cfg, work / "mnt", work / "daemon.log").start()
        state = work / "state"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        try:
            for d in DIRS:
                (m.path / d).mkdir(exist_ok=True)
            seconds = args.minutes * 60
            t0 = time.monotonic()
            pids = run_workers(m.path, state, seed, args.procs, seconds)
            rss = []
            while time.monotonic() - t0 < seconds:
                time.sleep(min(args.report_every, max(0.1, seconds - (time.monotonic() - t0))))
                ops, errors = progress(state)
                anon, filed = rss_mib(m.pid)
                rss.append(anon)
                st = admin(m, "stats")
                pend = {n: v["pending"] for n, v in st["mirrors"].items()}
                print(f"{time.monotonic() - t0:7.0f}s  ops {ops:8d}  errors {errors:4d}  "
                      f"rss {anon:6.1f}+{filed:5.1f} MiB  pending {pend}  "
                      f"evictions {st['evictions']}  "
                      f"downloads {st['downloads']}", flush=True)
            codes = wait_all(pids, 300)
            ops, errors = progress(state)
            print(f"workers done: exit codes {sorted(set(codes))}, {ops} operations, "
                  f"{errors} errors", flush=True)
            for p in state.glob("errors.*"):
                for line in p.read_text().splitlines()[:5]:
                    print(f"  {line}")
            wrong = [n for n in NAMES if digest_of(m.path / n) != expected(state, n)]
            print(f"last-writer check: {len(NAMES) - len(wrong)}/{len(NAMES)} files right"
                  + (f"; WRONG: {wrong}" if wrong else ""), flush=True)
            t1 = time.monotonic()
            r = admin(m, "drain", "--timeout", "1800")
            print(f"drain: {r} in {time.monotonic() - t1:.1f}s", flush=True)
            local = files_below(m.path)
            mirrors = {"dir": files_below(work / "dm"), "ftp": files_below(ftp.root),
                       "s3": s3_objects(s3)}
            same = {n: held == local for n, held in mirrors.items()}
            print(f"mirrors equal to the local tree ({len(local)} files): {same}")
            if rss:
                print(f"daemon RSS (anonymous): first {rss[0]:.1f} MiB, "
                      f"max {max(rss):.1f} MiB, last {rss[-1]:.1f} MiB")
            ok = (not wrong and errors == 0 and all(c == 0 for c in codes)
                  and r["drained"] and all(same.values()))
        finally:
            m.close()
    print("soak: PASS" if ok else f"soak: FAIL (seed {seed}; everything kept in {work})")
    if ok and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
