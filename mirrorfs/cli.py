"""The ``mirrorfs`` command: argument parsing, exit codes, daemonizing. No logic of its own.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid config, 3 already mounted.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable

from mirrorfs.config import Config, load_config
from mirrorfs.errors import ConfigError

log = logging.getLogger("mirrorfs")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


def _stale_release_reply(record: logging.LogRecord) -> bool:
    """pyfuse3 logs an ERROR when the kernel no longer waits for the reply to a RELEASE
    (ENOENT: a file closed just before an unmount; the release itself ran). Nothing is
    wrong then: keep the line, at DEBUG."""
    if record.levelno == logging.ERROR and record.getMessage().startswith(
            "fuse_release(): fuse_reply_* failed with No such file or directory"):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
    return True


def setup_logging(level: str, log_file: str | None = None) -> None:
    if _stale_release_reply not in logging.getLogger("pyfuse3").filters:
        logging.getLogger("pyfuse3").addFilter(_stale_release_reply)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _logs_to_stderr() -> bool:
    return any(type(h) is logging.StreamHandler and h.stream is sys.stderr
               for h in logging.getLogger().handlers)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mirrorfs: invalid config: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_mount(args: argparse.Namespace) -> int:
    setup_logging(args.log_level or "INFO")  # config warnings go through logging too
    cfg = _load(args.config)
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        print(f"mirrorfs: mount point {mountpoint} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    level = args.log_level or cfg.log_level
    if args.foreground:
        setup_logging(level, args.log_file)
        return _run_mount(cfg, mountpoint, args.options, lambda: None)
    # Daemonize: the parent returns only once the mount is live (or failed), with its status.
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg.startswith("OK"):
            return EXIT_OK
        status, _, text = msg.partition(" ")
        print(text.strip() or "mirrorfs: the daemon exited during start-up", file=sys.stderr)
        return int(status) if status.isdigit() else EXIT_FAIL
    os.close(rfd)
    os.setsid()
    log_file = args.log_file
    if log_file is None and sys.stderr.isatty():
        log_file = os.path.join(cfg.cache_dir, "mirrorfs.log")
        os.makedirs(cfg.cache_dir, mode=0o700, exist_ok=True)
    setup_logging(level, log_file)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if log_file:
        os.dup2(devnull, 2)
    os.chdir("/")
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(wfd, b"OK")
        os.close(wfd)
        reported = True

    failure = ""
    try:
        code = _run_mount(cfg, mountpoint, args.options, ready, report_fd=wfd)
    except BaseException as exc:
        code = EXIT_FAIL
        failure = f"mirrorfs: {exc}"
        log.exception("mirrorfs failed")
    if not reported:
        try:
            os.write(wfd, f"{code} {failure}".encode())
            os.close(wfd)
        except OSError:
            pass
    os._exit(code)


def _run_mount(cfg: Config, mountpoint: str, options: list[str], ready: Callable[[], None],
               report_fd: int | None = None) -> int:
    import trio

    from mirrorfs.mount import AlreadyMounted, serve

    def fail(code: int, msg: str) -> int:
        # Shown once: by the waiting parent when daemonizing, else here; logged as well
        # only when the log is not that same stderr.
        if report_fd is not None:
            try:
                os.write(report_fd, f"{code} {msg}".encode())
                os.close(report_fd)
            except OSError:
                pass
        else:
            print(msg, file=sys.stderr)
        if not _logs_to_stderr():
            log.error("%s", msg)
        return code

    try:
        trio.run(serve, cfg, mountpoint, options, ready)
    except AlreadyMounted as exc:
        return fail(EXIT_BUSY, f"mirrorfs: {exc}")
    except ConfigError as exc:
        return fail(EXIT_USAGE, f"mirrorfs: invalid config: {exc}")
    except OSError as exc:
        return fail(EXIT_FAIL, f"mirrorfs: {exc}")
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from mirrorfs.admin_cli import Progress, mirrorfs_mounts
    from mirrorfs.control import ControlClient

    mountpoint = os.path.realpath(args.mountpoint)  # the kernel lists the resolved path
    source = next((s for s, m in mirrorfs_mounts() if m == mountpoint), None)
    if source is None:
        print(f"mirrorfs: {mountpoint} is not a mirrorfs mount", file=sys.stderr)
        return EXIT_FAIL
    cfg = None
    try:
        cfg = load_config(source)
        client = ControlClient(cfg.cache_dir, timeout=None)
    except (ConfigError, OSError):
        client = None
    if client is not None:
        try:
            if args.wait:
                progress = Progress()
                r = client.call("drain", on_progress=progress, timeout=args.timeout,
                                deletes=args.deletes)
                progress.done()
                if not r["drained"]:
                    print(f"mirrorfs umount: {r['pending']} items still pending after "
                          f"{args.timeout}s; not unmounting", file=sys.stderr)
                    return EXIT_FAIL
            s = client.call("stats")
            left = s["journal_length"]
            if left:
                print(f"mirrorfs umount: {s['dirty_files']} files ({s['dirty_bytes']} bytes), "
                      f"{left} jobs in all, are not on every mirror yet; they stay queued and "
                      "upload at the next mount (use --wait to wait for them)", file=sys.stderr)
        finally:
            client.close()
    r = subprocess.run(["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint])
    if r.returncode:
        return EXIT_FAIL
    # Wait for the daemon to let go of the cache directory, so a new mount can start at once.
    if cfg is not None:
        lock = os.path.join(cfg.cache_dir, "lock")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
            finally:
                os.close(fd)
    return EXIT_OK


HELPER = """#!/bin/sh
# mount(8) helper for `mount -t fuse.mirrorfs CONFIG MOUNTPOINT -o OPTIONS` and fstab lines
# (written by `mirrorfs install-helper`). mount passes: SOURCE TARGET [-n] [-s] [-v] -o OPTS
src="$1"; dst="$2"; shift 2
opts=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) opts="$2"; shift 2 ;;
        -o*) opts="${1#-o}"; shift ;;
        *) shift ;;
    esac
done
exec %(python)s -m mirrorfs.cli mount "$src" "$dst" ${opts:+-o "$opts"}
"""


def cmd_check_config(args: argparse.Namespace) -> int:
    import trio

    from mirrorfs.maintenance import check_config

    setup_logging("WARNING")
    cfg = _load(args.config)
    return trio.run(check_config, cfg)


def cmd_install_helper(args: argparse.Namespace) -> int:
    path = os.path.join(args.dir, "mount.fuse.mirrorfs")
    text = HELPER % {"python": sys.executable}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    print(f"installed {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirrorfs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount CONFIG on MOUNTPOINT")
    m.add_argument("config")
    m.add_argument("mountpoint")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached (systemd, tests); log to stderr")
    m.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options, comma separated (allow_other, ro, ...)")
    m.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    m.add_argument("--log-file", help="log here instead of stderr")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount MOUNTPOINT cleanly")
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true", help="lazy unmount")
    u.add_argument("--wait", action="store_true",
                   help="first wait until every mirror holds everything")
    u.add_argument("--timeout", type=float, help="with --wait: give up after this many s")
    u.add_argument("--deletes", action="store_true",
                   help="with --wait: also carry out deletes held by delete_policy = "
                   "\"delayed\" (else they stay queued for the next mount)")
    u.set_defaults(func=cmd_umount)

    c = sub.add_parser("check-config",
                       help="parse CONFIG and probe every mirror (write, read, delete)")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)

    h = sub.add_parser("install-helper",
                       help="install /sbin/mount.fuse.mirrorfs for mount -t and fstab")
    h.add_argument("--dir", default="/sbin")
    h.set_defaults(func=cmd_install_helper)

    from mirrorfs.admin_cli import add_admin_commands

    add_admin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
