"""Background tasks of a running mount, started in the nursery that :func:`mount.serve` owns.

Owns nothing itself: it builds the remotes, the uploader, the fetcher, the evictor and the
control socket from the daemon's config and starts each in that nursery.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from mirrorfs.admin import COMMANDS
from mirrorfs.cache.fetch import Fetcher
from mirrorfs.config import Config, redacted
from mirrorfs.control import serve_control
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


async def start_workers(daemon: Daemon, nursery: trio.Nursery) -> None:
    cfg, reg, store, ops = daemon.cfg, daemon.reg, daemon.store, daemon.ops
    remotes = open_remotes(cfg)
    daemon.remotes = dict(remotes)
    stats = RuntimeStats()
    daemon.stats = stats
    rules = {r.name: r for r in reg.mirrors}
    states = [MirrorState(rule=rules[m.name], remote=remotes[m.name],
                          concurrency=m.concurrency, paused=cfg.paused)
              for m in cfg.mirrors]
    space = Space(reg, store, stats, cache_size=cfg.cache_size, min_free=cfg.min_free,
                  dirty_limit=cfg.dirty_limit)
    uploader = await Uploader.create(reg, store, ops, states, nursery)
    daemon.uploader = uploader
    fetcher = Fetcher(reg, store, remotes, list(cfg.read_order), stats, nursery,
                      is_up=lambda name: all(m.up for m in uploader.by_name(name)),
                      space=space)
    daemon.fetcher = fetcher
    daemon.space = space
    ops.fetcher, ops.space, ops.stats = fetcher, space, stats
    space.is_busy = lambda ino: ino in ops.open_files or ino in fetcher.downloads
    space.can_upload = lambda: any(m.up and not m.paused for m in uploader.mirrors.values())
    uploader.on_done = lambda ino: space.kick()
    fetcher.on_complete = space.touch
    nursery.start_soon(space.run, name="space")
    await nursery.start(serve_control, daemon, COMMANDS)
    nursery.start_soon(flush_stats, daemon, stats, name="stats")
