"""The ``mirrorfs`` command: argument parsing, exit codes, daemonizing. No logic of its own.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid config, 3 already mounted.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import logging.handlers
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

from mirrorfs.config import Config, load_config
from mirrorfs.errors import ConfigError

log = logging.getLogger("mirrorfs")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


def _stale_release_reply(record: logging.LogRecord) -> bool:
    """pyfuse3 logs an ERROR when the kernel no longer waits for the reply to a RELEASE or
    RELEASEDIR (ENOENT: a file or directory closed just before an unmount; the release itself
    ran). Nothing is wrong then: keep the line, at DEBUG."""
    msg = record.getMessage()
    if record.levelno == logging.ERROR and msg.startswith(
            ("fuse_release(): ", "fuse_releasedir(): ")) and msg.endswith(
            "fuse_reply_* failed with No such file or directory"):
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


def mounts_at(path: str) -> list[tuple[str, str]]:
    """(source, type) of every mount on ``path``, bottom first (the kernel's order)."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
                if point == path:
                    out.append((parts[0], parts[2]))
    return out


def clear_dead_mount(mountpoint: str, config_path: str) -> None:
    """A mirrorfs of this same config that died (kill -9, OOM) leaves its mount behind, where
    every access fails with ENOTCONN. Starting it again (systemd's Restart=on-failure) must
    not need a hand: the dead mount is detached first."""
    real = os.path.realpath(mountpoint)
    there = mounts_at(real)
    if not there or there[-1][1] != "fuse.mirrorfs" or \
            there[-1][0].replace("\\040", " ").replace("\\011", "\t") != config_path:
        return
    try:
        os.stat(real)
        return  # alive: check_mount_point says so
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
    log.warning("%s is the mount of a mirrorfs of %s that died; detaching it", real,
                config_path)
    subprocess.run(["fusermount3", "-u", "-z", real], check=False)


def check_mount_point(mountpoint: str, options: list[str]) -> str | None:
    """Why ``mountpoint`` must not be mounted on, or None. A mount there, or files in it,
    would be hidden under the new mount (``-o nonempty`` allows both)."""
    nonempty = "nonempty" in ",".join(options).split(",")
    real = os.path.realpath(mountpoint)
    there = mounts_at(real)
    if there and not nonempty:
        src, kind = there[-1]
        return (f"{real} is already a mount point ({kind} from {src}); unmount it first, or "
                "give -o nonempty to mount on top of it")
    if not os.path.isdir(mountpoint):
        return f"mount point {mountpoint} is not a directory"
    if nonempty:
        return None
    try:
        entries = os.listdir(real)
    except OSError as exc:
        return f"cannot list mount point {real}: {exc.strerror}"
    if entries:
        return (f"mount point {real} is not empty ({len(entries)} entries would be hidden); "
                "give -o nonempty to mount anyway")
    return None


def _daemon_log_handler(cfg: Config, log_file: str | None) -> str | None:
    """Where a daemonized mount logs: --log-file, else syslog (journald reads it) when its
    socket is there, else ``<cache_dir>/mirrorfs.log``. Returns a file name, or None for
    syslog (already set up here)."""
    if log_file:
        return log_file
    address = os.environ.get("MIRRORFS_SYSLOG_SOCKET", "/dev/log")
    if os.path.exists(address):
        try:
            handler = logging.handlers.SysLogHandler(
                address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            pass
        else:
            handler.setFormatter(logging.Formatter(
                "mirrorfs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().handlers[:] = [handler]
            return None
    os.makedirs(cfg.cache_dir, mode=0o700, exist_ok=True)
    return os.path.join(cfg.cache_dir, "mirrorfs.log")


class _StartupWarnings(logging.Handler):
    """Until the mount is live, warnings (a mirror unreachable at start) also go to the user
    who ran ``mount``: to the waiting parent through the status pipe, or to stderr."""

    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "reported", False):
            return  # the failure itself: the status message carries it
        try:
            self.write("mirrorfs: warning: " + record.getMessage().replace("\n", " "))
        except OSError:
            pass


def cmd_mount(args: argparse.Namespace) -> int:
    setup_logging(args.log_level or "INFO")  # config warnings go through logging too
    cfg = _load(args.config)
    mountpoint = os.path.abspath(args.mountpoint)
    clear_dead_mount(mountpoint, cfg.path)
    problem = check_mount_point(mountpoint, args.options)
    if problem:
        print(f"mirrorfs: {problem}", file=sys.stderr)
        return EXIT_USAGE
    level = args.log_level or cfg.log_level
    root = logging.getLogger()
    if args.foreground:
        setup_logging(level, args.log_file)
        startup = _StartupWarnings(lambda text: print(text, file=sys.stderr, flush=True))
        if not _logs_to_stderr():
            root.addHandler(startup)
        return _run_mount(cfg, mountpoint, args.options, lambda: root.removeHandler(startup))
    # Daemonize: the parent returns only once the mount is live (or failed), with its status.
    # The child sends "W <warning>" lines while it starts, then "OK" or "<status> <reason>".
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        while msg.startswith("W "):
            line, _, msg = msg.partition("\n")
            print(line[2:], file=sys.stderr)
        if msg.startswith("OK"):
            return EXIT_OK
        status, _, text = msg.partition(" ")
        print(text.strip() or "mirrorfs: the daemon exited during start-up", file=sys.stderr)
        return int(status) if status.isdigit() else EXIT_FAIL
    os.close(rfd)
    os.setsid()
    # Detached: nothing more reaches the caller's terminal or pipes (a script waiting for
    # the output of `mount` must not wait for the daemon).
    setup_logging(level, None)
    log_file = _daemon_log_handler(cfg, args.log_file)
    if log_file:
        setup_logging(level, log_file)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    reported = False
    warn_fd = os.dup(wfd)  # stays valid whatever closes wfd, until ready() or exit

    def warn(text: str) -> None:
        os.write(warn_fd, b"W " + text.encode(errors="replace") + b"\n")

    startup = _StartupWarnings(warn)
    root.addHandler(startup)

    def ready() -> None:
        nonlocal reported
        root.removeHandler(startup)
        os.close(warn_fd)
        os.write(wfd, b"OK")
        os.close(wfd)
        reported = True

    failure = ""
    try:
        code = _run_mount(cfg, mountpoint, args.options, ready, report_fd=wfd)
    except BaseException as exc:
        code = EXIT_FAIL
        failure = f"mirrorfs: {exc}"
        log.exception("mirrorfs failed", extra={"reported": True})
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
            log.error("%s", msg, extra={"reported": True})
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
    from mirrorfs.admin_cli import Progress
    from mirrorfs.control import ControlClient

    mountpoint = os.path.realpath(args.mountpoint)  # the kernel lists the resolved path
    there = mounts_at(mountpoint)
    if not there or there[-1][1] != "fuse.mirrorfs":  # only the top mount can be unmounted
        what = f" (the top mount there is {there[-1][1]})" if there else ""
        print(f"mirrorfs: {mountpoint} is not a mirrorfs mount{what}", file=sys.stderr)
        return EXIT_USAGE
    source = there[-1][0].replace("\\040", " ").replace("\\011", "\t")
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
    r = subprocess.run(["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint],
                       stderr=subprocess.PIPE, text=True)
    if r.returncode:
        print(r.stderr.strip() or f"mirrorfs: fusermount3 -u {mountpoint} failed",
              file=sys.stderr)
        return EXIT_BUSY if "busy" in r.stderr.lower() else EXIT_FAIL
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


def cmd_check_config(args: argparse.Namespace) -> int:
    import trio

    from mirrorfs.probe import check_config

    setup_logging("WARNING")
    cfg = _load(args.config)
    return trio.run(check_config, cfg)


def cmd_install_helper(args: argparse.Namespace) -> int:
    from mirrorfs.install import install_helper

    try:
        print(f"installed {install_helper(args.dir)}")
    except OSError as exc:
        print(f"mirrorfs install-helper: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    from mirrorfs.install import install

    try:
        for path in install(args.root):
            print(f"installed {path}")
    except OSError as exc:
        print(f"mirrorfs install: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if os.path.abspath(args.root) == "/":
        print("then: systemctl daemon-reload; systemctl enable --now mirrorfs@NAME "
              "(mounts /etc/mirrorfs/NAME.toml on /srv/NAME)")
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

    i = sub.add_parser("install", help="install /usr/local/bin/mirrorfs, the mount helper and "
                       "the systemd units")
    i.add_argument("--root", default="/", help="install under this directory (the files "
                   "name each other there)")
    i.set_defaults(func=cmd_install)

    from mirrorfs.admin_cli import add_admin_commands

    add_admin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except BrokenPipeError:
        # The reader went away (`mirrorfs stats | head -1`): it had what it wanted. Quiet,
        # and status 0; what is left in the buffer goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
