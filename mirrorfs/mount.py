"""Wiring: lock cache dir -> open and probe remotes -> open registry -> recover -> mount ->
start workers -> serve -> shut down (the config is loaded by the caller, :mod:`mirrorfs.cli`).

Owns the lifetime of the daemon. Every step is a small function; :func:`serve` only calls
them in order. The LMDB environment is flushed to disk every second and at shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import pyfuse3
import trio

from mirrorfs.cache.admin_ops import fold_deltas
from mirrorfs.cache.db import Database
from mirrorfs.cache.recover import recover
from mirrorfs.cache.registry import MirrorRule, Registry
from mirrorfs.cache.store import Store
from mirrorfs.config import Config
from mirrorfs.daemon import Daemon
from mirrorfs.fs import Operations
from mirrorfs.metrics import start_server, stop_server
from mirrorfs.probe import close_remotes
from mirrorfs.workers import Supervisor, health_check, open_and_probe, start_workers

log = logging.getLogger(__name__)

CLEAN_MARKER = "clean-shutdown"


class AlreadyMounted(Exception):
    pass


def lock_cache_dir(cache_dir: str) -> int:
    """Hold an exclusive lock on the cache dir for the daemon's life; refuse a second mount."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)  # private: it holds every file name
    path = os.path.join(cache_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadyMounted(
            f"cache directory {cache_dir} is in use by another mirrorfs "
            f"(pid {owner or 'unknown'}); unmount it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def mirror_rules(cfg: Config, reg_index: Callable[[str], int]) -> list[MirrorRule]:
    return [MirrorRule(index=reg_index(m.name), name=m.name, include=m.include,
                       exclude=m.exclude, delete_policy=m.delete_policy,
                       delete_delay=m.delete_delay if m.delete_policy == "delayed" else 0.0)
            for m in cfg.mirrors]


def open_registry(cfg: Config, mark_unclean: bool = True) -> tuple[Database, Registry, Store,
                                                                   bool]:
    meta = os.path.join(cfg.cache_dir, "meta")
    new = not os.path.exists(meta)
    db = Database(meta)
    reg = Registry(db, [], cfg.upload_delay)
    reg.mirrors = mirror_rules(cfg, reg.mirror_index)
    store = Store(cfg.cache_dir)
    marker = os.path.join(cfg.cache_dir, CLEAN_MARKER)
    if new:  # an empty registry: nothing to check after a crash that never happened
        with open(marker, "w"):
            pass
    clean = os.path.exists(marker)
    if mark_unclean:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
    return db, reg, store, clean


def replay_journal(reg: Registry, store: Store, clean: bool, new: bool = False) -> None:
    t0 = time.monotonic()
    counts = recover(reg, store, full_check=not clean)
    done = {k: v for k, v in counts.items() if v}
    log.info("startup check (%s) took %.2fs%s",
             "new cache directory" if new else "clean stop" if clean else "after a crash",
             time.monotonic() - t0, f": {done}" if done else "")


def mount_options(cfg: Config, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    # The config path as the source (as in fstab), so admin commands find the cache dir.
    src = cfg.path if not any(c in cfg.path for c in ", \t\n\\") else "mirrorfs"
    opts.add(f"fsname={src}")
    opts.add("subtype=mirrorfs")
    for o in extra:
        for part in o.split(","):
            part = part.strip()
            if part.startswith(("x-", "comment=")):
                continue  # meant for systemd/mount(8), not the kernel
            if part and part not in ("rw", "defaults", "_netdev", "nofail", "auto", "noauto",
                                     "user", "nouser", "exec", "suid", "dev", "relatime",
                                     "nonempty"):  # nonempty: checked by the command
                opts.add(part)
    return opts


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Raise the mount's read-ahead (its bdi in sysfs). Found through /proc/self/mountinfo,
    never by stat()ing the mount point, which would be a request to ourselves."""
    if kb <= 0:
        return
    real = os.path.normpath(mountpoint)  # no realpath: that would stat the mount point
    try:
        with open("/proc/self/mountinfo") as f:
            dev = next((parts[2] for parts in (line.split() for line in f)
                        if parts[4].replace("\\040", " ") == real), None)
        if dev is None:
            log.info("could not set read_ahead_kb: %s not in mountinfo", real)
            return
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.info("could not set read_ahead_kb on %s: %s", mountpoint, exc)


async def read_ahead_after_init(mountpoint: str, kb: int) -> None:
    """The kernel sets the mount's read-ahead when it gets our INIT reply; raise it after."""
    await trio.sleep(0.5)
    set_read_ahead(mountpoint, kb)


def sd_notify(state: str) -> None:
    """systemd Type=notify: tell the service manager READY=1 / STOPPING=1."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())


async def flush_loop(db: Database) -> None:
    """Make committed metadata durable on disk within a second (group commit)."""
    last = db.env.info()["last_txnid"]
    flush_limiter = trio.CapacityLimiter(1)  # one flush at a time; not the default 40
    while True:
        await trio.sleep(1.0)
        txnid = db.env.info()["last_txnid"]
        if txnid != last:
            last = txnid
            await trio.to_thread.run_sync(db.flush, limiter=flush_limiter)


async def watch_signals(daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for signum in sigs:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            daemon.stopping = True
            if daemon.uploader is not None:
                await daemon.uploader.finish_inflight(timeout=30.0)
            pyfuse3.terminate()
            return


async def serve(cfg: Config, mountpoint: str, options: list[str],
                ready: Callable[[], None] = lambda: None) -> None:
    """Run the mount until it is unmounted or signalled."""

    lock_fd = lock_cache_dir(cfg.cache_dir)
    remotes, probes = await open_and_probe(cfg)
    new = not os.path.exists(os.path.join(cfg.cache_dir, "meta"))
    db, reg, store, clean = open_registry(cfg)
    replay_journal(reg, store, clean, new)
    ops = Operations(reg, store, attr_timeout=cfg.attr_timeout, xattrs=cfg.xattrs,
                     readonly="ro" in mount_options(cfg, options),
                     stream_direct_io=cfg.stream_direct_io)
    daemon = Daemon(cfg, mountpoint, db, reg, store, ops, remotes=remotes, probes=probes)

    opts = mount_options(cfg, options)
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as exc:
        db.close()
        raise OSError(errno.EIO, f"cannot mount on {mountpoint}: {exc}") from None
    unmounted = False
    metrics_server = None
    try:
        async with trio.open_nursery() as nursery:
            sup = daemon.supervisor = Supervisor(nursery, lambda: health_check(daemon))
            sup.start_soon("flush", flush_loop, db)
            sup.start_soon("signals", watch_signals, daemon)
            nursery.start_soon(read_ahead_after_init, mountpoint, cfg.read_ahead_kb)
            await start_workers(daemon, sup)
            if cfg.metrics_listen:
                metrics_server = start_server(daemon, cfg.metrics_listen)
            log.info("mirrorfs mounted %s on %s", cfg.cache_dir, mountpoint)
            ready()
            sd_notify("READY=1")
            await pyfuse3.main()
            unmounted = True
            nursery.cancel_scope.cancel()
    finally:
        stop_server(metrics_server)
        await close_remotes(daemon.remotes)
        if daemon.stats is not None:
            fold_deltas(reg, daemon.stats)
        ops.close_all()
        pyfuse3.close(unmount=not unmounted or daemon.stopping)
        db.flush()
        db.close()
        with open(os.path.join(cfg.cache_dir, CLEAN_MARKER), "w"):
            pass
        os.close(lock_fd)
        log.info("mirrorfs stopped (%s)", mountpoint)
