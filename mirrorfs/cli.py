"""The ``mirrorfs`` command: argument parsing, exit codes, daemonizing. No logic of its own.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid config, 3 already mounted.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

from mirrorfs.config import Config, load_config
from mirrorfs.errors import ConfigError

log = logging.getLogger("mirrorfs")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


def setup_logging(level: str, log_file: str | None = None) -> None:
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


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mirrorfs: invalid config: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_mount(args: argparse.Namespace) -> int:
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
        code, _, text = msg.partition(" ")
        print(text.strip() or "mirrorfs: the daemon exited during start-up", file=sys.stderr)
        return int(code) if code.isdigit() else EXIT_FAIL
    os.close(rfd)
    os.setsid()
    log_file = args.log_file
    if log_file is None and sys.stderr.isatty():
        log_file = os.path.join(cfg.cache_dir, "mirrorfs.log")
        os.makedirs(cfg.cache_dir, exist_ok=True)
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

    try:
        code = _run_mount(cfg, mountpoint, args.options, ready, report_fd=wfd)
    except BaseException:
        code = EXIT_FAIL
    if not reported:
        try:
            os.write(wfd, f"{code} ".encode())
            os.close(wfd)
        except OSError:
            pass
    os._exit(code)


def _run_mount(cfg: Config, mountpoint: str, options: list[str], ready: object,
               report_fd: int | None = None) -> int:
    import trio

    from mirrorfs.mount import AlreadyMounted, serve

    def fail(code: int, msg: str) -> int:
        print(msg, file=sys.stderr)
        log.error("%s", msg)
        if report_fd is not None:
            try:
                os.write(report_fd, f"{code} {msg}".encode())
                os.close(report_fd)
            except OSError:
                pass
        return code

    try:
        trio.run(serve, cfg, mountpoint, options, ready)
    except AlreadyMounted as exc:
        return fail(EXIT_BUSY, f"mirrorfs: {exc}")
    except OSError as exc:
        return fail(EXIT_FAIL, f"mirrorfs: {exc}")
    return EXIT_OK


def _mount_source(mountpoint: str) -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == mountpoint and parts[2].startswith("fuse"):
                return parts[0]
    return None


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if _mount_source(mountpoint) is None:
        print(f"mirrorfs: {mountpoint} is not a mirrorfs mount", file=sys.stderr)
        return EXIT_FAIL
    r = subprocess.run(["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint])
    if r.returncode:
        return EXIT_FAIL
    deadline = time.monotonic() + 30
    while _mount_source(mountpoint) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
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
    u.set_defaults(func=cmd_umount)

    from mirrorfs.admin_cli import add_admin_commands

    add_admin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
