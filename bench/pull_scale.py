"""Benchmark: pull of a bucket holding N objects (default 100,000) into a fresh node.

The objects are created in moto's in-process backend (fast) but the pull itself talks HTTP
to the moto server like any other run. Prints keys per second for the whole pull, and for an
interrupted-then-resumed pull.

    .venv/bin/python bench/pull_scale.py [--objects 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mountutil import Mount, write_config  # noqa: E402
from tests.servers import MotoS3  # noqa: E402

CLI = [sys.executable, "-m", "mirrorfs.cli"]
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def populate(bucket: str, n: int) -> None:
    from moto.s3.models import s3_backends

    backend = s3_backends["123456789012"]["global"]
    for i in range(n):
        backend.put_object(bucket, f"media/{i // 1000:04d}/img{i:07d}.jpg", b"%d" % i)


def admin(cfg: Path, *args: str) -> dict:
    r = subprocess.run([*CLI, *args, "-c", str(cfg), "--json"], capture_output=True,
                       text=True, check=True, cwd=REPO)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MotoS3(bucket="pull-bench") as s3:
        t0 = time.monotonic()
        populate(s3.bucket, args.objects)
        print(f"populated {args.objects:,} objects in {time.monotonic() - t0:.1f}s")
        results = []
        for label, interrupt in (("straight", False), ("interrupted + resumed", True)):
            base = Path(tmp) / label.replace(" ", "")
            base.mkdir()
            cfg = write_config(base / "c.toml", {"cache_dir": str(base / "cache"),
                                                 "node_id": "bench"},
                               {"s3": {"type": "s3", **s3.options(), "pull": True,
                                       "pull_interval": 86400, "rescan_interval": 86400,
                                       "pull_batch": args.batch}})
            m = Mount(cfg, base / "mnt", base / "log").start()
            try:
                t0 = time.monotonic()
                if interrupt:
                    p = subprocess.Popen([*CLI, "pull", "-c", str(cfg)], cwd=REPO,
                                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
                    time.sleep(max(1.0, args.objects / 20_000))
                    p.send_signal(signal.SIGINT)
                    p.wait()
                    mid = admin(cfg, "stats")["files"]
                    print(f"  interrupted after {time.monotonic() - t0:.1f}s with {mid:,} "
                          "files registered")
                admin(cfg, "pull")
                secs = time.monotonic() - t0
                files = admin(cfg, "stats")["files"]
                rss = int(next(line.split()[1] for line in
                               open(f"/proc/{m.pid}/status") if line.startswith("VmHWM")))
            finally:
                m.close()
            ok = "right" if files == args.objects else f"WRONG ({files:,})"
            results.append((label, secs, files))
            print(f"{label}: {args.objects:,} keys in {secs:.1f}s = "
                  f"{args.objects / secs:,.0f} keys/s; registry {ok}; daemon peak RSS "
                  f"{rss / 1024:.0f} MiB")
        return 0 if all(f == args.objects for _l, _s, f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
