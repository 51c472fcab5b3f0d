"""Background tasks of a running mount, started in the nursery that :func:`mount.serve` owns.

Owns nothing itself: it builds the remotes, the uploader, the fetcher, the evictor and the
control socket from the daemon's config and starts each in that nursery.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from mirrorfs.admin import COMMANDS, file_state
from mirrorfs.cache.fetch import Fetcher
from mirrorfs.config import Config, redacted
from mirrorfs.control import serve_control
from mirrorfs.errors import ConfigError
from mirrorfs.maintenance import cmd_import, cmd_verify, probe_all
from mirrorfs.pagecache import PageDropper, session_fd
from mirrorfs.pull import Sync, cmd_conflicts, cmd_pull
from mirrorfs.remotes.base import Remote, make_remote
from mirrorfs.space import Space
from mirrorfs.stats import RuntimeStats
from mirrorfs.uploader import MirrorState, Uploader

if TYPE_CHECKING:
    from mirrorfs.mount import Daemon

log = logging.getLogger(__name__)


def open_remotes(cfg: Config) -> dict[str, Remote]:
    """Construct every remote (no network I/O: that happens in probes and jobs)."""
    remotes: dict[str, Remote] = {}
    for m in cfg.mirrors:
        opts = dict(m.options)
        opts.setdefault("concurrency", m.concurrency)
        log.debug("mirror %s (%s): %s", m.name, m.type, redacted(opts))
        remotes[m.name] = make_remote(m.name, m.type, opts)
    return remotes


async def close_remotes(remotes: dict[str, Remote]) -> None:
    with trio.CancelScope(shield=True):
        for r in remotes.values():
            try:
                await r.aclose()
            except Exception:
                log.exception("closing mirror %s", r.name)


async def flush_stats(daemon: Daemon, stats: RuntimeStats) -> None:
    """Fold the in-memory hot-path counters into LMDB once a second."""
    while True:
        await trio.sleep(1.0)
        if stats.pending():
            with daemon.db.begin(write=True) as txn:
                stats.flush(txn, daemon.reg.counters)


def install_virtual_xattrs(daemon: Daemon) -> None:
    """``user.mirrorfs.state`` and ``user.mirrorfs.url.<mirror>`` on every regular file."""
    reg, ops = daemon.reg, daemon.ops

    def names(inode: int) -> list[bytes]:
        node = reg.get(inode)
        if node is None or not stat.S_ISREG(node.mode):
            return []
        out = [b"user.mirrorfs.state"]
        out += [b"user.mirrorfs.url." + name.encode() for name, r in daemon.remotes.items()
                if r.url("x")]
        return out

    def value(inode: int, name: bytes) -> bytes | None:
        node = reg.get(inode)
        if node is None or not stat.S_ISREG(node.mode):
            return None
        if name == b"user.mirrorfs.state":
            return file_state(daemon, node)["state"].encode()
        prefix = b"user.mirrorfs.url."
        if name.startswith(prefix):
            remote = daemon.remotes.get(name[len(prefix):].decode(errors="replace"))
            url = remote.url(os.fsdecode(reg.path_of(inode))) if remote else None
            return url.encode() if url else None
        return None

    ops.virtual_xattr = value  # type: ignore[method-assign]
    ops.virtual_xattr_names = names  # type: ignore[method-assign]


async def open_and_probe(cfg: Config) -> tuple[dict[str, Remote],
                                                dict[str, tuple[str, str, float]]]:
    """Build the remotes and probe each: a permanent error (no such bucket, access denied)
    is a config error and stops the mount; an unreachable mirror is a warning."""
    remotes = open_remotes(cfg)
    probes = await probe_all(remotes)
    for name, (status, detail, _secs) in probes.items():
        if status == "error":
            await close_remotes(remotes)
            raise ConfigError(cfg.path, f"mirrors.{name}", detail)
        if status == "unreachable":
            log.warning("mirror %s is unreachable at start (%s); its queue waits", name, detail)
    return remotes, probes


async def start_workers(daemon: Daemon, nursery: trio.Nursery) -> None:
    cfg, reg, store, ops = daemon.cfg, daemon.reg, daemon.store, daemon.ops
    remotes = daemon.remotes
    probes = daemon.probes
    stats = RuntimeStats()
    daemon.stats = stats
    rules = {r.name: r for r in reg.mirrors}
    states = [MirrorState(rule=rules[m.name], remote=remotes[m.name],
                          concurrency=m.concurrency, paused=cfg.paused,
                          up=probes[m.name][0] == "ok", last_error=probes[m.name][1]
                          if probes[m.name][0] != "ok" else "")
              for m in cfg.mirrors]

    space = Space(reg, store, stats, cache_size=cfg.cache_size, min_free=cfg.min_free,
                  dirty_limit=cfg.dirty_limit)
    uploader = await Uploader.create(reg, store, ops, states, nursery)
    daemon.uploader = uploader
    fetcher = Fetcher(reg, store, remotes, list(cfg.read_order), stats, nursery,
                      is_up=lambda name: all(m.up for m in uploader.by_name(name)),
                      space=space)
    daemon.fetcher = fetcher
    fuse_fd = None if cfg.stream_direct_io else session_fd()
    if fuse_fd is not None:
        fetcher.dropper = PageDropper(fuse_fd)
    daemon.space = space
    ops.fetcher, ops.space, ops.stats = fetcher, space, stats
    space.is_busy = lambda ino: ino in ops.open_files or ino in fetcher.downloads
    space.is_up = lambda name: all(m.up for m in uploader.by_name(name))
    space.can_upload = lambda: any(m.up and not m.paused for m in uploader.mirrors.values())
    uploader.on_done = lambda ino: space.kick()
    fetcher.on_complete = space.touch
    install_virtual_xattrs(daemon)
    nursery.start_soon(space.run, name="space")
    daemon.syncs = []
    for mcfg, mstate in zip(cfg.mirrors, states, strict=True):
        if mcfg.pull:
            mstate.publish = True
            sync = Sync(daemon, mcfg, mstate)
            daemon.syncs.append(sync)
            nursery.start_soon(sync.run, name=f"pull:{mcfg.name}")
    await nursery.start(serve_control, daemon,
                        {**COMMANDS, "import": cmd_import, "verify": cmd_verify,
                         "pull": cmd_pull, "conflicts": cmd_conflicts})
    nursery.start_soon(flush_stats, daemon, stats, name="stats")
