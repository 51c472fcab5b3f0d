"""Background tasks of a running mount, started in the nursery that :func:`mount.serve` owns.

Owns nothing itself: it builds the remotes, the uploader, the fetcher, the evictor and the
control socket from the daemon's config and starts each in that nursery.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from mirrorfs.config import Config, redacted
from mirrorfs.remotes.base import Remote, make_remote
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


async def start_workers(daemon: Daemon, nursery: trio.Nursery) -> None:
    cfg = daemon.cfg
    remotes = open_remotes(cfg)
    daemon.remotes = dict(remotes)
    rules = {r.name: r for r in daemon.reg.mirrors}
    states = [MirrorState(rule=rules[m.name], remote=remotes[m.name],
                          concurrency=m.concurrency, paused=cfg.paused)
              for m in cfg.mirrors]
    daemon.uploader = await Uploader.create(daemon.reg, daemon.store, daemon.ops, states,
                                            nursery)
