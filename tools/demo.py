"""The demo: mirrorfs with an embedded default config over loopback S3 and FTP servers.

Starts moto (S3 API) and pyftpdlib (FTP) on 127.0.0.1, writes ``demo/mirrorfs.toml`` with
three mirrors (S3, FTP, a directory), mounts ``demo/mnt``, prints what to try, and waits for
Ctrl-C; then waits for the uploads, unmounts and stops the servers. ``--check`` runs a short
scripted round trip instead and exits non-zero if anything is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mountutil import Mount, write_config  # noqa: E402
from tests.servers import MotoS3, PyFtpd  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.WARNING)

MIRRORFS = [sys.executable, "-m", "mirrorfs.cli"]


def build(base: Path, s3: MotoS3, ftp: PyFtpd) -> Path:
    return write_config(base / "mirrorfs.toml", {
        "cache_dir": str(base / "cache"),
        "cache_size": "2G",
        "upload_delay": 3,
        "xattrs": True,
    }, {
        "s3": {"type": "s3", **s3.options(), "url_base": f"{s3.endpoint_url}/{s3.bucket}"},
        "ftp": {"type": "ftp", **ftp.options()},
        "backup": {"type": "dir", "path": str(base / "backup-dir")},
    })


def admin(*args: str) -> str:
    return subprocess.run([*MIRRORFS, *args], check=True, capture_output=True, text=True,
                          cwd=REPO).stdout


def check(mnt: Path, s3: MotoS3, ftp_root: Path, base: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (mnt / "media").mkdir()
    (mnt / "media" / "clip.bin").write_bytes(data)
    (mnt / "notes.txt").write_text("hello from mirrorfs\n")
    admin("drain", "--timeout", "60", "-c", str(base / "mirrorfs.toml"))
    obj = s3.client().get_object(Bucket=s3.bucket, Key="media/clip.bin")
    assert obj["Body"].read() == data, "S3 copy differs"
    assert (ftp_root / "media" / "clip.bin").read_bytes() == data, "FTP copy differs"
    assert (base / "backup-dir" / "media" / "clip.bin").read_bytes() == data, "dir copy differs"
    admin("evict", "-c", str(base / "mirrorfs.toml"), str(mnt / "media" / "clip.bin"))
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    assert (mnt / "media" / "clip.bin").read_bytes() == data, "read-back after evict differs"
    print(admin("stats", "-c", str(base / "mirrorfs.toml")))
    print("demo check: OK (written, mirrored to S3, FTP and a directory, evicted, read back "
          f"{hashlib.sha256(data).hexdigest()[:12]}...)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=str(REPO / "demo"), help="where to put everything")
    ap.add_argument("--check", action="store_true", help="scripted round trip, then exit")
    args = ap.parse_args()
    base = Path(args.dir).resolve()
    if args.check and base.exists():
        subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    (base / "backup-dir").mkdir(exist_ok=True)
    ftp_root = base / "ftp-root"
    ftp_root.mkdir(exist_ok=True)
    with MotoS3(bucket="mirrorfs-demo") as s3, PyFtpd(ftp_root) as ftp:
        cfg = build(base, s3, ftp)
        mount = Mount(cfg, base / "mnt", base / "daemon.log")
        mount.start()
        try:
            if args.check:
                check(mount.path, s3, ftp_root, base)
                return 0
            print(f"""
mirrorfs is mounted on {mount.path}
  config:  {cfg}   (log: {mount.log})
  mirrors: S3 bucket {s3.bucket} at {s3.endpoint_url}, FTP {ftp_root} via 127.0.0.1:{ftp.port},
           directory {base / 'backup-dir'}

Try, in another shell:
  cp -r /usr/share/doc/fuse3 {mount.path}/          # lands on local disk at once
  .venv/bin/mirrorfs stats -c {cfg}                 # pending uploads per mirror
  sleep 4; .venv/bin/mirrorfs stats -c {cfg}        # after the 3 s cool-down: uploaded
  find {ftp_root} {base / 'backup-dir'}
  .venv/bin/mirrorfs evict -c {cfg} {mount.path}/fuse3   # drop local copies
  cat {mount.path}/fuse3/*                          # streamed back, verified by xxhash
  getfattr -d -m - {mount.path}/fuse3/*             # user.mirrorfs.state and URLs

Ctrl-C to stop (waits for pending uploads, then unmounts).""", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            print("\nwaiting for uploads...", flush=True)
            subprocess.run([*MIRRORFS, "umount", "--wait", "--timeout", "120",
                            str(mount.path)], cwd=REPO)
            return 0
        finally:
            mount.close()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
