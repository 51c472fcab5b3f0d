"""Opening the mirrors and probing them: at start-up (workers.open_and_probe) and for
`mirrorfs check-config`.

Owns no state. A probe writes, reads back and deletes one small object
(:meth:`Remote.probe`), with a timeout, so that a mirror that is down or refuses us is
known before the first job.
"""

from __future__ import annotations

import logging
import time

import trio

from mirrorfs.config import Config, redacted
from mirrorfs.errors import MirrorfsError, MirrorGone, PermanentRemoteError
from mirrorfs.remotes.base import Remote, make_remote

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


PROBE_TIMEOUT = 15.0


# ---------------------------------------------------------------- probes


async def probe_one(remote: Remote) -> tuple[str, str, float]:
    """("ok" | "unreachable" | "error", detail, seconds) for one mirror."""
    t0 = time.monotonic()
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            await remote.probe()
    except (PermanentRemoteError, MirrorGone) as exc:  # a wrong name in the config
        return "error", str(exc), time.monotonic() - t0
    except trio.TooSlowError:
        return "unreachable", f"no answer in {PROBE_TIMEOUT:.0f}s", time.monotonic() - t0
    except MirrorfsError as exc:
        return "unreachable", str(exc), time.monotonic() - t0
    return "ok", "write, read back and delete worked", time.monotonic() - t0


async def probe_all(remotes: dict[str, Remote]) -> dict[str, tuple[str, str, float]]:
    results: dict[str, tuple[str, str, float]] = {}

    async def one(name: str, r: Remote) -> None:
        results[name] = await probe_one(r)

    async with trio.open_nursery() as n:
        for name, r in remotes.items():
            n.start_soon(one, name, r)
    return results


async def check_config(cfg: Config) -> int:
    """`mirrorfs check-config`: one line per mirror; 0 all ok, 1 a mirror unreachable (it
    may come back: `mount` only warns), 2 a mirror that refuses us (no such bucket, access
    denied: `mount` refuses it as a config error too)."""
    remotes = open_remotes(cfg)
    try:
        results = await probe_all(remotes)
    finally:
        await close_remotes(remotes)
    print(f"{cfg.path}: config is valid; cache_dir {cfg.cache_dir}")
    for m in cfg.mirrors:
        status, detail, secs = results[m.name]
        print(f"mirror {m.name} ({m.type}): {status.upper() if status != 'ok' else 'ok'}: "
              f"{detail} ({secs:.2f}s)")
    statuses = {r[0] for r in results.values()}
    return 2 if "error" in statuses else 1 if "unreachable" in statuses else 0
