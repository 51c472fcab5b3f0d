#!/usr/bin/env python3
"""mirrorfs against boto3 through a shaped link: our own TCP proxy on loopback with a bandwidth
cap and a one-way delay in each direction, between every client and the moto server.

    .venv/bin/python bench/shaped.py [--reps 3] [--sizes-mib 4,256]
                                     [--links loopback,100:20,25:20]

On loopback the limit is the stack (1 MiB FUSE requests served from Python); users read over a
real network. Each link (``MBPS:MS``: megabytes per second each way, milliseconds of one-way
delay; ``loopback``: no proxy, the stack's limit) gets one proxy process and one mirrorfs mount
whose S3 mirror goes through it (its own bucket); boto3 goes through the same proxy. Per
repetition, link and size, in an order that alternates which goes first:

- upload: mirrorfs: a file written and closed on the mount, until the object is complete in
  the bucket (polled on moto directly, not through the link), minus the mount's upload_delay;
  boto3: ``upload_file`` with the same part size, threshold and concurrency as the mirror.
- cold read: mirrorfs: ``mirrorfs evict`` (checked), drop_caches, one reader process: first
  4 KiB, first MiB, whole file; boto3: drop_caches, one streamed ``get_object`` of the same
  object: the same three times.

Ratios are speed ratios (> 1: mirrorfs faster) per repetition, median reported, with issue
19's goals: cold-read throughput >= 0.95x the GET, first byte <= the GET's + one round trip,
upload within 1.1x of boto3. The proxy's CPU seconds are reported: a proxy near one core is the
limit, not the link. Measures and asserts nothing. Writes bench/results/<date>-shaped.md/.json.

The proxy alone: ``bench/shaped.py --proxy PORT HOST:PORT MBPS MS`` (prints its port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import run as B  # noqa: E402  (bench/run.py: Moto, Bucket, LoopFs, Mirrorfs, drop_caches)

MiB = B.MiB
DELAY = 1.0  # the mounts' upload_delay, subtracted from their upload times
#: mirrorfs's S3 defaults (mirrorfs/remotes/s3.py), given to boto3's TransferConfig as well
PART_SIZE = 8 * MiB
THRESHOLD = 64 * MiB
CHUNK = 64 * 1024


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------

class Link:
    """One direction of the link, shared by every connection: a FIFO of ``rate`` bytes/s, then
    ``delay`` seconds of propagation."""

    def __init__(self, rate: float, delay: float) -> None:
        self.rate, self.delay, self.free = rate, delay, 0.0

    def arrival(self, n: int, now: float) -> float:
        start = max(now, self.free)
        self.free = start + n / self.rate
        return self.free + self.delay


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    """Forward one direction: each chunk leaves when the link has carried it, in order. A
    bounded queue (the link's buffer) pushes back on the sender through TCP."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)

    async def send() -> None:
        while True:
            at, data = await q.get()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            await q.put((link.arrival(len(data), loop.time()), data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()


async def serve_proxy(port: int, target: str, mbps: float, ms: float) -> None:
    host, tport = target.rsplit(":", 1)
    up, down = Link(mbps * 1e6, ms / 1000.0), Link(mbps * 1e6, ms / 1000.0)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(host, int(tport))
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(pump(cr, sw, up), pump(sr, cw, down))
        finally:
            for w in (cw, sw):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


class Proxy:
    def __init__(self, target: str, mbps: float, ms: float) -> None:
        self.proc = subprocess.Popen([B.PY, __file__, "--proxy", "0", target, str(mbps),
                                      str(ms)], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        B.remember_pid(self.proc.pid, "shaped.py")
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            self.stop()
            raise RuntimeError("the proxy did not start")
        self.endpoint = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        B.forget_pid(self.proc.pid)


class Via:
    """What bench/run.py's Mirrorfs and Bucket want of a Moto: the endpoint the mount uses (the
    proxy) and a client for the bench's own checks (moto directly, never shaped)."""

    def __init__(self, moto: B.Moto, endpoint: str) -> None:
        self.moto, self.endpoint = moto, endpoint

    def client(self) -> Any:
        return self.moto.client()


# --------------------------------------------------------------------------------------------
# Workers (a process of their own, never the bench's)
# --------------------------------------------------------------------------------------------

def worker_main(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    now = time.perf_counter
    if kind == "readfile":
        t = now()
        fd = os.open(a["path"], os.O_RDONLY)
        total = len(os.read(fd, 4096))
        first = now() - t
        while total < MiB:
            n = len(os.read(fd, MiB - total))
            if not n:
                break
            total += n
        first_mib = now() - t
        while n := len(os.read(fd, MiB)):
            total += n
        os.close(fd)
        return {"ttfb": first, "ttfb_mib": first_mib, "seconds": now() - t, "bytes": total}
    import boto3
    import boto3.s3.transfer
    import botocore.config

    s3 = boto3.client("s3", endpoint_url=a["endpoint"], region_name=B.REGION,
                      aws_access_key_id=B.CREDS["access_key_id"],
                      aws_secret_access_key=B.CREDS["secret_access_key"],
                      config=botocore.config.Config(max_pool_connections=16))
    if kind == "get":
        t = now()
        body = s3.get_object(Bucket=a["bucket"], Key=a["key"])["Body"]
        total = len(body.read(4096))
        first = now() - t
        total += len(body.read(MiB - total))
        first_mib = now() - t
        for c in body.iter_chunks(MiB):
            total += len(c)
        return {"ttfb": first, "ttfb_mib": first_mib, "seconds": now() - t, "bytes": total}
    if kind == "upload":
        cfg = boto3.s3.transfer.TransferConfig(multipart_threshold=THRESHOLD,
                                               multipart_chunksize=PART_SIZE,
                                               max_concurrency=a["concurrency"])
        t = now()
        s3.upload_file(a["path"], a["bucket"], a["key"], Config=cfg)
        return {"seconds": now() - t}
    raise SystemExit(f"unknown worker {kind}")


def worker(kind: str, **args: Any) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(B.REPO))
    r = subprocess.run([B.PY, __file__, "--worker", kind, json.dumps(args)], capture_output=True,
                       text=True, timeout=1800, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"worker {kind} failed: {r.stderr.strip()[-400:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------

def parse_link(s: str) -> tuple[str, float, float]:
    if s == "loopback":
        return s, 0.0, 0.0
    mbps, ms = (float(x) for x in s.split(":"))
    return f"{mbps:g} MB/s, {ms:g} ms each way", mbps, ms


#: (key, title, unit, higher is better)
ROWS = [("upload", "upload: close -> object complete", "s", False),
        ("ttfb", "cold read: first 4 KiB", "ms", False),
        ("ttfb_mib", "cold read: first MiB", "ms", False),
        ("read", "cold read: throughput", "MB/s", True)]


class Bench:
    def __init__(self, root: Path, moto: B.Moto, links: list[str], sizes: list[int]) -> None:
        self.root, self.moto, self.sizes = root, moto, sizes
        self.links: list[tuple[str, float, float]] = [parse_link(x) for x in links]
        self.proxies: dict[str, Proxy] = {}
        self.mounts: dict[str, B.Mirrorfs] = {}
        # (link, size, row, system) -> one figure per repetition
        self.values: dict[tuple[str, int, str, str], list[float]] = {}
        self.proxy_cpu: dict[tuple[str, int, str], list[float]] = {}  # (link, size, system)
        self.src = root / "upload-src.dat"

    def start(self) -> None:
        with open(self.src, "wb") as f:
            for _ in range(max(self.sizes) // MiB):
                f.write(os.urandom(MiB))
        target = self.moto.endpoint.removeprefix("http://")
        for i, (label, mbps, ms) in enumerate(self.links):
            endpoint = self.moto.endpoint
            if mbps:
                self.proxies[label] = p = Proxy(target, mbps, ms)
                endpoint = p.endpoint
            m = B.Mirrorfs(self.root, Via(self.moto, endpoint), f"shaped{i}", DELAY)  # type: ignore[arg-type]
            m.start()
            self.mounts[label] = m
            B.log(f"link {label}: mirrorfs on {m.root}, endpoint {endpoint}")

    def stop(self) -> None:
        for m in self.mounts.values():
            m.stop()
        for p in self.proxies.values():
            p.stop()

    def put(self, link: str, size: int, row: str, system: str, v: float) -> None:
        self.values.setdefault((link, size, row, system), []).append(v)

    def cpu(self, link: str) -> float:
        p = self.proxies.get(link)
        return B.tree_cpu(p.proc.pid) if p else 0.0

    def endpoint(self, link: str) -> str:
        p = self.proxies.get(link)
        return p.endpoint if p else self.moto.endpoint

    def one(self, link: str, size: int, system: str) -> None:
        """Upload then cold read of one file of ``size`` by ``system`` over ``link``."""
        m = self.mounts[link]
        assert m.bucket is not None
        b, key, ep = m.bucket, f"f{size // MiB}m.dat", self.endpoint(link)
        c0 = self.cpu(link)
        if system == "mirrorfs":
            with open(self.src, "rb") as src, open(m.root / key, "wb") as dst:
                dst.write(src.read(size))
            closed = time.monotonic()
            B.wait_until(lambda: b.size_of(key) == size, 1800, 0.02)
            self.put(link, size, "upload", system, time.monotonic() - closed - DELAY)
            m.make_remote_only(key)
            B.drop_caches()
            r = worker("readfile", path=str(m.root / key))
        else:
            part = self.root / f"part-{size}.dat"
            with open(self.src, "rb") as src, open(part, "wb") as dst:
                dst.write(src.read(size))
            B.drop_caches()
            r0 = worker("upload", endpoint=ep, bucket=b.name, key=key, path=str(part),
                        concurrency=B.CONCURRENCY)
            part.unlink()
            self.put(link, size, "upload", system, r0["seconds"])
            B.drop_caches()
            r = worker("get", endpoint=ep, bucket=b.name, key=key)
        if r["bytes"] != size:
            raise RuntimeError(f"{system} read {r['bytes']} bytes of {size}")
        self.put(link, size, "ttfb", system, r["ttfb"] * 1000)
        self.put(link, size, "ttfb_mib", system, r["ttfb_mib"] * 1000)
        self.put(link, size, "read", system, size / r["seconds"] / 1e6)
        if link in self.proxies:
            self.proxy_cpu.setdefault((link, size, system), []).append(self.cpu(link) - c0)
        if system == "mirrorfs":
            (m.root / key).unlink()
            B.wait_until(lambda: b.size_of(key) is None, 600, 0.05)
        else:
            b.s3.delete_object(Bucket=b.name, Key=key)
        B.log(f"  {link} {B.human_size(size)} {system:8s}: upload "
              f"{self.values[(link, size, 'upload', system)][-1]:.2f} s, first 4 KiB "
              f"{r['ttfb'] * 1000:.1f} ms, first MiB {r['ttfb_mib'] * 1000:.1f} ms, "
              f"{size / r['seconds'] / 1e6:.0f} MB/s")

    def run(self, reps: int) -> None:
        for rep in range(reps):
            for link, _, _ in self.links:
                for size in self.sizes:
                    order = ["mirrorfs", "boto3"] if rep % 2 == 0 else ["boto3", "mirrorfs"]
                    for system in order:
                        self.one(link, size, system)

    def ratios(self, link: str, size: int, row: str, higher: bool) -> list[float]:
        a = self.values.get((link, size, row, "mirrorfs"), [])
        b = self.values.get((link, size, row, "boto3"), [])
        return [(x / y if higher else y / x) for x, y in zip(a, b, strict=False)
                if x > 0 and y > 0]

    def report(self, reps: int, elapsed: float, info: dict[str, str]) -> Path:
        def cell(v: list[float]) -> str:
            if not v:
                return "—"
            s = B.fmt(statistics.median(v))
            return s + (f" ({B.fmt(min(v))}{B.DASH}{B.fmt(max(v))})" if len(v) > 1 else "")

        lines = [f"# mirrorfs through a shaped link, {dt.datetime.now():%Y-%m-%d %H:%M}", ""]
        lines += [f"- **{k}**: {v}" for k, v in info.items()]
        lines += [f"- **repetitions**: {reps}, mirrorfs and boto3 alternating which goes first; "
                  f"{elapsed / 60:.1f} min", "",
                  f"Part size {PART_SIZE // MiB} MiB, multipart from {THRESHOLD // MiB} MiB, "
                  f"concurrency {B.CONCURRENCY} for both. mirrorfs upload times have its "
                  f"upload_delay ({DELAY:g} s) subtracted. Ratios: speed ratios mirrorfs / "
                  "boto3 (> 1: mirrorfs faster), median (min-max) of per-repetition ratios.", "",
                  "| link | file | measure | unit | mirrorfs | boto3 | mirrorfs / boto3 | goal |",
                  "|---|---|---|---|---|---|---|---|"]
        goals = []
        for link, _, ms in self.links:
            rtt = 2 * ms
            for size in self.sizes:
                for row, title, unit, higher in ROWS:
                    rs = self.ratios(link, size, row, higher)
                    g = ""
                    if row == "read" and link != "loopback":
                        g = self.verdict(rs and statistics.median(rs) >= 0.95, ">= 0.95x GET")
                    elif row == "upload" and link != "loopback":
                        g = self.verdict(rs and statistics.median(rs) >= 1 / 1.1,
                                         "within 1.1x of upload_file")
                    elif row == "ttfb" and link != "loopback":
                        mf = self.values.get((link, size, row, "mirrorfs"), [])
                        bt = self.values.get((link, size, row, "boto3"), [])
                        extra = [x - y for x, y in zip(mf, bt, strict=False)]
                        g = self.verdict(extra and statistics.median(extra) <= rtt,
                                         f"<= GET + one RTT ({rtt:g} ms)")
                        if extra:
                            g += f", median extra {statistics.median(extra):.1f} ms"
                    if g:
                        goals.append(f"- {link}, {B.human_size(size)}, {title}: {g}")
                    rr = (f"{statistics.median(rs):.2f}x" + (
                        f" ({min(rs):.2f}{B.DASH}{max(rs):.2f})" if len(rs) > 1 else "")
                        if rs else "—")
                    lines.append(f"| {link} | {B.human_size(size)} | {title} | {unit} | "
                                 f"{cell(self.values.get((link, size, row, 'mirrorfs'), []))}"
                                 f" | {cell(self.values.get((link, size, row, 'boto3'), []))}"
                                 f" | {rr} | {g} |")
        lines += ["", "## Goals", "", *goals, "", "## Proxy CPU", ""]
        for (link, size, system), v in self.proxy_cpu.items():
            lines.append(f"- {link}, {B.human_size(size)}, {system}: the proxy's CPU for the "
                         f"upload + read: {cell(v)} s")
        text = "\n".join(lines) + "\n"
        B.RESULTS.mkdir(exist_ok=True)
        out = B.RESULTS / f"{dt.date.today().isoformat()}-shaped.md"
        out.write_text(text)
        raw = {"info": info, "values": {"|".join(map(str, k)): v for k, v in self.values.items()},
               "proxy_cpu": {"|".join(map(str, k)): v for k, v in self.proxy_cpu.items()}}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        return out

    @staticmethod
    def verdict(ok: object, label: str) -> str:
        return f"{label}: {'**met**' if ok else '**not met**'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes-mib", default="4,256")
    p.add_argument("--links", default="loopback,100:20,25:20",
                   help="comma-separated: loopback (no proxy) or MBPS:MS (each way)")
    p.add_argument("--proxy", nargs=4, metavar=("PORT", "TARGET", "MBPS", "MS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.proxy:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_proxy(int(a.proxy[0]), a.proxy[1], float(a.proxy[2]),
                                    float(a.proxy[3])))
        return 0
    if a.worker:
        print(json.dumps(worker_main(a.worker[0], json.loads(a.worker[1]))))
        return 0
    if os.geteuid() != 0:
        sys.exit("shaped: needs root (loop mount, drop_caches, FUSE)")
    sizes = [int(x) * MiB for x in a.sizes_mib.split(",") if x.strip()]
    B.WORK.mkdir(exist_ok=True)
    B.clean_stale()
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack, B.signals_as_interrupt():
        fs = B.LoopFs("16G")
        stack.callback(fs.stop)
        root = fs.start()
        moto = B.Moto()
        stack.callback(moto.stop)
        moto.start()
        bench = Bench(root, moto, [x.strip() for x in a.links.split(",") if x.strip()], sizes)
        stack.callback(bench.stop)
        info = B.machine_info(fs.note)
        bench.start()
        with contextlib.suppress(KeyboardInterrupt):
            bench.run(a.reps)
        info["load average at end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    out = bench.report(a.reps, time.monotonic() - t0, info)
    B.log(f"report: {out}")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
