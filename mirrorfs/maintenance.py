"""Long admin operations that talk to the mirrors: import, verify.

Owns no state; each runs as a control-socket command in the daemon (``import`` and
``verify`` need the remotes) and reports progress. ``import`` is restartable: its cursor is
saved per mirror identity and prefix in the same transaction as each page it registers.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from mirrorfs.admin import files_for, mirror_names
from mirrorfs.cache import admin_ops as ops
from mirrorfs.cache import content, cursors
from mirrorfs.cache.db import LOCAL_FULL
from mirrorfs.control import Progress
from mirrorfs.daemon import live
from mirrorfs.errors import InvalidKey, MirrorfsError, NotFound, PermanentRemoteError
from mirrorfs.hashing import file_digest
from mirrorfs.names import safe_key
from mirrorfs.remotes.base import MAX_FILE_SIZE, ObjectMeta, Remote, RemoteStat

if TYPE_CHECKING:
    from mirrorfs.daemon import Daemon

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- import


async def cmd_import(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    (name, idx), = mirror_names(d, req["mirror"])
    prefix = req.get("prefix") or ""
    remote: Remote = d.remotes[name]
    mcfg = next(m for m in d.cfg.mirrors if m.name == name)
    cursor_key = f"import:{mcfg.identity()}:{prefix}".encode()
    v = cursors.get(d.reg.db, cursor_key)
    cursor = v.decode() if v else None
    counts = {"added": 0, "attached": 0, "exists": 0, "blocked": 0, "rejected": 0,
              "dirs": 0, "unreadable": 0}
    #: keys not imported and why: a bad key is that key's problem, never the end of the run
    skipped: list[dict[str, str]] = []
    resumed = cursor is not None
    with_meta = not req.get("fast")
    while True:
        page = await remote.list(prefix, cursor, limit=int(req.get("batch", 1000)))
        metas = {}
        unreadable = set()
        for st in page.entries:
            try:
                remote.check_key(st.key)  # one the mirror cannot address can never be read
                if with_meta:
                    metas[st.key] = (await remote.stat(st.key)).meta
            except NotFound:
                metas[st.key] = None
            except (InvalidKey, PermanentRemoteError) as exc:
                counts["unreadable"] += 1
                unreadable.add(st.key)
                skipped.append({"key": st.key, "reason": str(exc)})
                log.warning("import from %s: key %r cannot be read from the mirror (%s); "
                            "skipped", name, st.key[:200], exc)
        items = [it for st in page.entries if st.key not in unreadable
                 and (it := _listed(st, prefix, metas, name, counts, skipped)) is not None]
        for it, status in zip(items, ops.import_page(d.reg, idx, items, cursor_key,
                                                     page.cursor), strict=True):
            if not (it.folder and status == "exists"):  # a directory already there: nothing
                counts[status] += 1
        await progress({k: v for k, v in counts.items() if v})
        if page.cursor is None:
            break
        cursor = page.cursor
    return {**counts, "resumed": resumed, "skipped": skipped}


def _listed(st: RemoteStat, prefix: str, metas: dict[str, ObjectMeta | None], name: str,
            counts: dict[str, int], skipped: list[dict[str, str]]) -> ops.Listed | None:
    """What to register for one listed object, or None (counted, logged and listed in
    ``skipped``) if it cannot be a file of the mount."""
    rel = st.key[len(prefix):] if prefix and st.key.startswith(prefix) else st.key
    marker = safe_key(rel[:-1]) if rel.endswith("/") and st.size == 0 else None
    if marker is not None:  # an S3 folder marker ("dir/", no bytes): a directory
        return ops.Listed(marker, folder=True)
    path = safe_key(rel)
    if path is None:
        counts["rejected"] += 1
        skipped.append({"key": st.key, "reason": "cannot be a path in the mount"})
        log.warning("import from %s: key %r cannot be a path in the mount; skipped",
                    name, st.key)
        return None
    meta = metas.get(st.key) or st.meta
    digest = bytes.fromhex(meta.xxhash) if meta and meta.xxhash else None
    if not 0 <= st.size <= MAX_FILE_SIZE:
        counts["rejected"] += 1
        skipped.append({"key": st.key, "reason": f"listed size {st.size}"})
        log.warning("import from %s: %r is listed with size %d; skipped", name,
                    st.key, st.size)
        return None
    if meta is not None and meta.size != st.size:
        log.warning("import from %s: %r says it holds %d bytes but has %d; "
                    "its hash is not trusted", name, st.key, meta.size, st.size)
        digest = None
    mtime = (meta.mtime_ns if meta and meta.mtime_ns else st.mtime_ns) or time.time_ns()
    # permission bits only: a foreign bucket must not plant setuid/setgid files
    mode = meta.mode & 0o777 if meta and meta.mode is not None else 0o644
    return ops.Listed(path, os.fsencode(st.key), st.size, mtime, mode, digest)


# ---------------------------------------------------------------- verify


async def cmd_verify(d: Daemon, req: dict[str, Any], progress: Progress) -> Any:
    """Recompute hashes of cached files; with ``remote`` check the mirrors' copies too."""
    report: dict[str, Any] = {"ok": [], "corrupt": [], "no_reference": [],
                                    "remote_missing": [], "remote_bad": [], "repaired": []}
    nodes = list(files_for(d.reg, req.get("paths", [])))
    repair = bool(req.get("repair"))
    # the whole mount against the mirrors: the audit (one listing per mirror) instead of a
    # request per recorded file; it also finds objects no file owns
    whole = bool(req.get("remote")) and not req.get("paths") and d.auditor is not None
    limiter = trio.CapacityLimiter(2)
    for i, node in enumerate(nodes):
        path = d.reg.path_of(node.ino).decode("utf-8", "backslashreplace")
        if node.local == LOCAL_FULL and not (d.ops is not None and d.ops.is_open(node.ino)):
            digest = await trio.to_thread.run_sync(file_digest, d.store.path(node.ino),
                                                   limiter=limiter)
            if node.hash_ver != node.ver or not node.hash_ver:
                report["no_reference"].append(path)
            elif bytes.fromhex(digest) != node.hash:
                report["corrupt"].append(path)
                log.error("verify: cached copy of %r does not match its xxhash", path)
                if repair and await _redownload(d, node.ino):
                    report["repaired"].append(path)
            else:
                report["ok"].append(path)
        if req.get("remote") and not whole:
            await _verify_remote(d, node.ino, path, bool(req.get("deep")), repair, report)
        if i % 50 == 0:
            await progress({"checked": i + 1, "total": len(nodes)})
    if whole:
        await _audit_all(d, bool(req.get("deep")), repair, report, progress)
    if d.uploader is not None:
        d.uploader.kick()
    return {k: v for k, v in report.items() if v} | {"checked": len(nodes)}


async def _audit_all(d: Daemon, deep: bool, repair: bool, report: dict[str, Any],
                     progress: Progress) -> None:
    """`verify --remote` of the whole mount: the audit of every mirror (audit.py)."""
    for name, _idx in mirror_names(d, None):
        state = live(d.uploader, "verify --remote").by_name(name)[0]
        await progress({"auditing": name})
        f = await live(d.auditor, "verify --remote").audit(state, deep=deep, repair=repair)
        if f.error:
            report.setdefault("remote_unreachable", []).append(f"{name}: {f.error}")
        for kind, out in (("missing", "remote_missing"), ("changed", "remote_bad"),
                          ("stray", "remote_stray"), ("foreign", "remote_foreign")):
            report.setdefault(out, []).extend(f"{name}:{k}" for k in f.keys[kind])
        if repair:
            report["repaired"].extend(f"{name}:{k}" for k in f.repaired)
        report.setdefault("remote_checked", 0)
        report["remote_checked"] += f.checked


async def _redownload(d: Daemon, ino: int) -> bool:
    """Drop a bad cached copy and fetch it again, if a mirror holds the current version."""
    if not content.drop_if_mirrored(d.reg, ino):
        return False
    d.store.remove(ino)
    node = d.reg.get(ino)
    assert node is not None
    try:
        await live(d.fetcher, "verify --repair").fetch_all(node)
    except (MirrorfsError, OSError) as exc:  # this file's problem, not the whole run's
        log.error("verify: could not download %r again: %s", d.reg.path_of(ino), exc)
        return False
    return True


async def _verify_remote(d: Daemon, ino: int, path: str, deep: bool, repair: bool,
                         report: dict[str, list[str]]) -> None:
    import xxhash

    node = d.reg.get(ino)
    if node is None:
        return
    with d.reg.db.begin() as txn:  # every key (one per hard link) on every mirror
        copies = [(m, rc) for m in d.reg.mirrors
                  for rc in d.reg.remote_copies(txn, m.index, ino)]
    for m, rc in copies:
        remote: Remote = d.remotes[m.name]
        key = os.fsdecode(rc.path)
        problem = None
        try:
            st = await remote.stat(key)
            if st.size != rc.size:
                problem = f"size {st.size} != {rc.size}"
            elif st.meta is not None and st.meta.xxhash and rc.hash.strip(b"\0") and \
                    st.meta.xxhash != rc.hash.hex():
                problem = "hash metadata differs"
            elif deep:
                h = xxhash.xxh3_128()
                async with remote.open_read(key) as stream:
                    while chunk := await stream.read():
                        h.update(chunk)
                if rc.hash.strip(b"\0") and h.digest() != rc.hash:
                    problem = "content does not match its xxhash"
        except NotFound:
            report["remote_missing"].append(f"{m.name}:{path}")
            problem = "missing"
        except MirrorfsError as exc:
            log.warning("verify: %s unreachable for %r: %s", m.name, path, exc)
            continue
        if problem is None:
            continue
        if problem != "missing":
            report["remote_bad"].append(f"{m.name}:{path}: {problem}")
        log.warning("verify: copy of %r on %s: %s", path, m.name, problem)
        if repair:
            ops.requeue_copy(d.reg, m.index, ino, rc.path)
            report["repaired"].append(f"{m.name}:{path}")

