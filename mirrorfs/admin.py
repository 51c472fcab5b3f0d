"""Admin commands: what they do to a live daemon (through the control socket) or offline.

Owns no state. Each ``cmd_*`` coroutine takes the daemon, the request and a progress callback
and returns something JSON-serialisable; :mod:`mirrorfs.commands` is the table the control
socket serves.
Statistics come from counters kept in LMDB with every change, so ``stats`` costs the same on
a million files as on ten.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from mirrorfs.audit import audit_stats
from mirrorfs.cache import admin_ops as ops
from mirrorfs.cache import cursors
from mirrorfs.cache.admin_ops import paused_mirrors
from mirrorfs.cache.db import (
    F_LOST,
    F_PINNED,
    JOB_CLAIMED,
    JOB_FAILED,
    LOCAL_FULL,
    ROOT_INO,
    Inode,
    get_counter,
)
from mirrorfs.cache.journal import Signal
from mirrorfs.cache.registry import Registry
from mirrorfs.control import Progress
from mirrorfs.daemon import live
from mirrorfs.errors import MirrorfsError
from mirrorfs.pull import sync_stats

if TYPE_CHECKING:
    from mirrorfs.daemon import Daemon

log = logging.getLogger(__name__)

STAT_NAMES = ("files", "dirs", "symlinks", "bytes", "local_files", "local_bytes",
              "dirty_files", "dirty_bytes", "hits", "misses", "downloads", "download_bytes",
              "evictions", "evicted_bytes", "verify_failures", "whole_hash_downloads",
              "unverified_downloads", "read_errors", "unstored_pages_dropped", "quarantined")
MIRROR_STAT_NAMES = ("jobs", "failed", "copies", "copy_bytes", "uploads", "upload_bytes",
                     "deletes", "renames", "server_copies", "last_success")


# ---------------------------------------------------------------- helpers




def resolve(reg: Registry, path: str) -> Inode:
    """A path relative to the mount root (as the CLI sends it) to its inode."""
    node = reg.get(ROOT_INO)
    assert node is not None
    for part in os.fsencode(path).split(b"/"):
        if part in (b"", b"."):
            continue
        child = reg.lookup(node.ino, part)
        if child is None:
            raise LookupError(f"{path}: no such file in the mount")
        node = child
    return node


def walk_files(reg: Registry, node: Inode) -> Iterator[Inode]:
    """Every regular file at or below ``node``."""
    if stat.S_ISREG(node.mode):
        yield node
        return
    stack = [node.ino]
    while stack:
        ino = stack.pop()
        for _name, child_ino in reg.list_dir(ino):
            child = reg.get(child_ino)
            if child is None:
                continue
            if stat.S_ISDIR(child.mode):
                stack.append(child.ino)
            elif stat.S_ISREG(child.mode):
                yield child


def files_for(reg: Registry, paths: list[str]) -> Iterator[Inode]:
    for p in paths or [""]:
        yield from walk_files(reg, resolve(reg, p))


def mirror_names(d: Daemon, name: str | None) -> list[tuple[str, int]]:
    rules = [(m.name, m.index) for m in d.reg.mirrors]
    if name is None:
        return rules
    found = [r for r in rules if r[0] == name]
    if not found:
        raise LookupError(f"no mirror named {name!r} (have: {', '.join(r[0] for r in rules)})")
    return found


# ---------------------------------------------------------------- stats


def collect_stats(d: Daemon) -> dict[str, Any]:
    reg = d.reg
    now = time.time()
    out: dict[str, Any] = {}
    paused = paused_mirrors(reg)
    with reg.db.begin() as txn:
        for n in STAT_NAMES:
            out[n] = get_counter(txn, reg.counters, n.encode())
        if d.stats is not None:
            for n, v in d.stats.delta.items():
                out[n] = out.get(n, 0) + v
        out["remote_only_files"] = out["files"] - out["local_files"]
        out["remote_only_bytes"] = out["bytes"] - out["local_bytes"]
        mirrors: dict[str, Any] = {}
        journal = 0
        for m in reg.mirrors:
            ms: dict[str, Any] = {
                n: get_counter(txn, reg.counters, b"m%d.%s" % (m.index, n.encode()))
                for n in MIRROR_STAT_NAMES}
            ms["pending"] = ms["jobs"] - ms["failed"]
            journal += ms["jobs"]
            oldest = reg.journal.next_due(txn, m.index)
            ms["oldest_pending_age"] = (max(0.0, now - (oldest - reg.upload_delay))
                                        if oldest is not None else None)
            state = d.uploader.by_name(m.name)[0] if d.uploader is not None else None
            ms["in_flight"] = len(state.in_flight) if state else 0
            ms["up"] = state.up if state else None
            pause = paused.get(m.name)
            ms["paused"] = state.paused if state else bool(pause or d.cfg.paused)
            ms["paused_since"] = pause["since"] if pause and ms["paused"] else None
            ms["paused_by"] = (pause["by"] if pause else "config (paused = true)"
                               if d.cfg.paused else None) if ms["paused"] else None
            ms["last_error"] = state.last_error if state else ""
            ms["uploaded"] = ms.pop("copies")
            ms["uploaded_bytes"] = ms.pop("copy_bytes")
            ms.update(audit_stats(reg, txn, m.index))
            ms["delayed_deletes"] = len(ops.held_deletes(d.reg, txn, m.index, now))
            mirrors[m.name] = ms
        out["mirrors"] = mirrors
        out["journal_length"] = journal

    out["pull"] = sync_stats(d)
    # per supervised task: restarts after an unexpected exception (see workers.Supervisor)
    out["tasks"] = d.supervisor.stats() if d.supervisor is not None else {}
    out["cache_size"] = d.cfg.cache_size
    out["dirty_limit"] = d.cfg.dirty_limit
    out["online"] = d.uploader is not None
    return out


async def cmd_stats(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    return collect_stats(d)


def list_queue(d: Daemon, mirror: str | None, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with d.reg.db.begin() as txn:
        for name, idx in mirror_names(d, mirror):
            for ino, job in d.reg.journal.iter_jobs(txn, idx):
                if len(out) >= limit:
                    return out
                node = d.reg.get_txn(txn, ino)
                path = (d.reg.path_txn(txn, node).decode("utf-8", "backslashreplace")
                        if node is not None else None)
                out.append({"mirror": name, "ino": ino, "path": path,
                            "state": ("failed" if job.state == JOB_FAILED else "in flight"
                                      if job.state == JOB_CLAIMED else "pending"),
                            "due": job.due, "attempts": job.attempts, "error": job.error,
                            "deleted": node is None or node.nlink == 0})
    return out


async def cmd_queue(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    return list_queue(d, req.get("mirror"), int(req.get("limit", 1000)))


async def cmd_retry(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    n = ops.retry_failed(d.reg, [idx for _name, idx in mirror_names(d, req.get("mirror"))],
                         time.time())
    if d.uploader is not None:
        d.uploader.kick()
    return {"retried": n}


def _who(req: dict[str, Any]) -> str:
    """The user behind a request: the control socket's peer (SO_PEERCRED), or us offline."""
    uid = req.get("peer_uid", os.getuid())
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


async def cmd_pause(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    names = [m for m, _ in mirror_names(d, req.get("mirror"))]
    ops.set_paused(d.reg, names, {"since": time.time(), "by": _who(req)})
    if d.uploader is not None:
        d.uploader.pause(req.get("mirror"))
    return {"paused": names}


async def cmd_resume(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    names = [m for m, _ in mirror_names(d, req.get("mirror"))]
    ops.clear_paused(d.reg, names)
    if d.uploader is not None:
        d.uploader.resume(req.get("mirror"))
    return {"resumed": names}


# ---------------------------------------------------------------- local / remote


def file_state(d: Daemon, node: Inode) -> dict[str, Any]:
    reg = d.reg
    out: dict[str, Any] = {"local": node.local == LOCAL_FULL,
                           "pinned": bool(node.flags & F_PINNED),
                           "lost": bool(node.flags & F_LOST), "mirrors": {}}
    with reg.db.begin() as txn:
        path = reg.path_txn(txn, node)
        dirty = False
        for m in reg.mirrors:
            job = reg.journal.get(txn, m.index, node.ino)
            rc = reg.remote_copy(txn, m.index, node.ino, path)
            if job is not None:
                dirty = True
                s = "failed" if job.state == JOB_FAILED else "pending"
            elif not m.wants(path):
                s = "excluded"
            elif rc is not None and rc.ver == node.ver and rc.path == path:
                s = "uploaded"
            else:
                s = "missing"
            out["mirrors"][m.name] = s
    if node.flags & F_LOST:
        out["state"] = "lost"
    elif node.local != LOCAL_FULL:
        out["state"] = "remote-only"
    elif dirty:
        out["state"] = "dirty"
    elif reg.mirrors and all(v in ("uploaded", "excluded") for v in out["mirrors"].values()):
        out["state"] = "uploaded"
    else:
        out["state"] = "local"
    return out


async def cmd_state(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    return {p: file_state(d, resolve(d.reg, p)) for p in req.get("paths", [])}


async def cmd_evict(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    done, kept = 0, []
    for node in files_for(d.reg, req.get("paths", [])):
        if node.local != LOCAL_FULL:
            continue
        if live(d.space, "evict").evict(node.ino, force_pinned=bool(req.get("force"))) is None:
            kept.append(d.reg.path_of(node.ino).decode("utf-8", "backslashreplace"))
        else:
            done += 1
    return {"evicted": done, "kept": kept}


def _set_pin(d: Daemon, paths: list[str], pin: bool) -> int:
    return sum(ops.set_pinned(d.reg, node.ino, pin) for node in files_for(d.reg, paths))


async def cmd_pin(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Pinned files are never evicted. A remote-only one is kept once it is read; with
    ``fetch`` it is downloaded now."""
    paths = req.get("paths", [])
    remote = [n for n in files_for(d.reg, paths) if n.local != LOCAL_FULL]
    if remote and req.get("fetch"):
        if d.fetcher is None:
            raise RuntimeError("--fetch needs the running mirrorfs (mount it first)")
        for i, node in enumerate(remote):
            await d.fetcher.fetch_all(node)
            await progress({"downloaded": i + 1, "total": len(remote)})
    n = _set_pin(d, paths, True)
    return {"pinned": n, "remote_only": 0 if req.get("fetch") else len(remote),
            "downloaded": len(remote) if req.get("fetch") else 0}


async def cmd_unpin(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    return {"unpinned": _set_pin(d, req.get("paths", []), False)}


def expedite_all(d: Daemon, inos: list[int] | None = None, deletes: bool = True) -> int:
    """Skip the cool-down: every pending job (or those of ``inos``) is due now; with
    ``deletes`` False, not the deletes held by a delayed delete policy."""
    n = ops.expedite(d.reg, inos, deletes, time.time())
    if d.uploader is not None:
        d.uploader.kick()
    return n


def journal_length(d: Daemon, inos: list[int] | None = None,
                   count_failed: bool = True) -> int:
    with d.reg.db.begin() as txn:
        if inos is None:
            total = 0
            for m in d.reg.mirrors:
                total += get_counter(txn, d.reg.counters, b"m%d.jobs" % m.index)
                if not count_failed:
                    total -= get_counter(txn, d.reg.counters, b"m%d.failed" % m.index)
            return total
        return sum(1 for ino in inos for m in d.reg.mirrors
                   if (job := d.reg.journal.get(txn, m.index, ino)) is not None
                   and (count_failed or job.state != JOB_FAILED))


def held_count(d: Daemon) -> int:
    now = time.time()
    with d.reg.db.begin() as txn:
        return sum(len(ops.held_deletes(d.reg, txn, m.index, now)) for m in d.reg.mirrors)


#: the longest a waiting command goes without looking again: what no event reports (a mirror
#: found up again by a probe, a pause lifted) is seen within this
RECHECK = 1.0


async def until_changed(d: Daemon) -> None:
    """Wait for a change of the journal or of a start-up sweep (or :data:`RECHECK`)."""
    with trio.move_on_after(RECHECK):
        async with trio.open_nursery() as n:
            async def on(signal: Signal) -> None:
                await signal.wait()
                n.cancel_scope.cancel()

            n.start_soon(on, d.reg.journal.changed)
            if d.auditor is not None:
                n.start_soon(on, d.auditor.swept_changed)


def unswept(d: Daemon) -> list[str]:
    """Mirrors that are up and whose start-up clean-up of cut transfers has not run yet."""
    if d.auditor is None or d.uploader is None:
        return []
    return [m.rule.name for m in d.uploader.mirrors.values()
            if m.up and m.rule.name not in d.auditor.swept]


async def cmd_drain(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Wait until every mirror holds everything that is due or can be done now (failed
    items do not block; they are listed). Deletes held by ``delete_policy = "delayed"`` are
    reported, not expedited, unless ``deletes`` is set: the undo window survives a drain."""
    timeout = req.get("timeout")
    deletes = bool(req.get("deletes"))
    expedite_all(d, deletes=deletes)
    start = trio.current_time()
    last = -1.0

    def left() -> int:
        return journal_length(d, count_failed=False) - (0 if deletes else held_count(d))

    with trio.move_on_after(float(timeout) if timeout else float("inf")) as scope:
        while (n := left()) > 0 or unswept(d):
            if trio.current_time() - last >= 1.0:
                await progress({"pending": n})
                last = trio.current_time()
            expedite_all(d, deletes=deletes)
            round_at = trio.current_time()
            await until_changed(d)
            # at most ten rounds a second: each one reads every job (and every job change
            # fires the signal)
            await trio.sleep_until(round_at + 0.1)
    failed = journal_length(d) - journal_length(d, count_failed=False)
    return {"drained": not scope.cancelled_caught, "pending": max(0, left()),
            "failed": failed, "held_deletes": 0 if deletes else held_count(d),
            "seconds": round(trio.current_time() - start, 3)}


async def cmd_move(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    direction = req.get("direction")
    nodes = list(files_for(d.reg, req.get("paths", [])))
    if direction == "to-local":
        n = 0
        failed: list[dict[str, str]] = []  # one file's problem is not the whole move's
        for node in nodes:
            if node.local != LOCAL_FULL:
                try:
                    await live(d.fetcher, "move").fetch_all(node)
                except (MirrorfsError, OSError) as exc:
                    path = d.reg.path_of(node.ino).decode("utf-8", "backslashreplace")
                    failed.append({"path": path, "reason": str(exc)})
                    log.warning("move --to-local: %r: %s", path, exc)
                    continue
                n += 1
            await progress({"done": n, "total": len(nodes)})
        _set_pin(d, req.get("paths", []), True)
        return {"downloaded": n, "pinned": len(nodes), "failed": failed}
    if direction != "to-remote":
        raise ValueError("direction must be to-local or to-remote")
    inos = [n.ino for n in nodes]
    _set_pin(d, req.get("paths", []), False)
    expedite_all(d, inos)
    while (left := journal_length(d, inos, count_failed=False)) > 0:
        await progress({"uploading": left, "total": len(inos)})
        expedite_all(d, inos)
        await until_changed(d)
    evicted, kept = 0, []
    for ino in inos:
        if live(d.space, "move").evict(ino) is not None:
            evicted += 1
        else:
            cur = d.reg.get(ino)
            if cur is not None and cur.local == LOCAL_FULL:
                kept.append(d.reg.path_of(ino).decode("utf-8", "backslashreplace"))
    return {"evicted": evicted, "kept": kept}


async def cmd_backfill(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Queue every file for one mirror, in batches, restartable from a saved cursor."""
    (name, idx), = mirror_names(d, req["mirror"])
    rule = next(m for m in d.reg.mirrors if m.index == idx)
    batch = int(req.get("batch", 1000))
    total = 0
    after = cursors.get_seq(d.reg.db, ops.backfill_key(name))
    resumed = after > 0
    while True:
        queued, last = ops.backfill_step(d.reg, rule, time.time(), after, batch)
        total += queued
        if last == 0:
            break
        after = last
        await progress({"queued": total, "ino": last})
        await _throttle(d, name, idx, 2 * batch)
    if d.uploader is not None:
        d.uploader.kick()
    return {"queued": total, "resumed": resumed}


async def _throttle(d: Daemon, name: str, idx: int, most: int) -> None:
    """Let a running mirror's queue drain below ``most`` jobs before queueing more, so a
    migration of millions of files never holds millions of jobs at once."""
    if d.uploader is None:
        return
    state = d.uploader.by_name(name)[0]
    while state.up and not state.paused and not d.uploader.draining:
        with d.reg.db.begin() as txn:
            if get_counter(txn, d.reg.counters, b"m%d.jobs" % idx) < most:
                return
        await until_changed(d)
    await trio.sleep(0)


async def cmd_url(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    node = resolve(d.reg, req["path"])
    out = {}
    for name, _idx in mirror_names(d, req.get("mirror")):
        remote = d.remotes.get(name)
        out[name] = remote.url(os.fsdecode(d.reg.path_of(node.ino))) if remote else None
    return out
