"""The admin subcommands of ``mirrorfs``: find the daemon, call it, print the answer.

A command goes to the running daemon through its control socket; where it is safe without a
daemon (stats, queue, retry, pin, unpin, backfill, state) it opens the LMDB registry directly,
under the same lock the daemon takes. Output is a human table by default and JSON with
``--json``; long commands show progress on a terminal and plain lines otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from mirrorfs.config import Config, load_config
from mirrorfs.control import CommandError, ControlClient
from mirrorfs.errors import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3



class AdminError(Exception):
    """A one-line failure of an admin command, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.status = status


def mirrorfs_mounts() -> list[tuple[str, str]]:
    """(source, mountpoint) of every mirrorfs mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "fuse.mirrorfs":
                unesc = [p.replace("\\040", " ").replace("\\011", "\t") for p in parts[:2]]
                out.append((unesc[0], unesc[1]))
    return out


def locate(args: argparse.Namespace) -> tuple[Config, str | None]:
    config = getattr(args, "config", None)
    mounts = mirrorfs_mounts()
    if config:
        cfg = load_config(config)
        mp = next((m for s, m in mounts if os.path.abspath(s) == cfg.path), None)
        return cfg, mp
    given = list(getattr(args, "paths", None) or [])
    if getattr(args, "path", None):  # `url PATH`
        given.append(args.path)
    probe = [os.path.abspath(p) for p in given] + [os.getcwd()]
    for p in probe:
        for src, mp in sorted(mounts, key=lambda x: -len(x[1])):
            if p == mp or p.startswith(mp.rstrip("/") + "/"):
                return load_config(src), mp
    if len(mounts) == 1:
        return load_config(mounts[0][0]), mounts[0][1]
    raise AdminError("which mount? give --config CONFIG "
                     f"({len(mounts)} mirrorfs mounts found)", EXIT_USAGE)


def rel_paths(paths: list[str], mountpoint: str | None) -> list[str]:
    out = []
    for p in paths:
        ap = os.path.abspath(p)
        if mountpoint and (ap == mountpoint or ap.startswith(mountpoint.rstrip("/") + "/")):
            out.append(os.path.relpath(ap, mountpoint) if ap != mountpoint else "")
        elif os.path.isabs(p) and mountpoint:
            raise AdminError(f"{p} is not under the mount {mountpoint}", EXIT_USAGE)
        else:
            out.append(p)
    return out


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def print_stats(s: dict[str, Any]) -> None:
    print(f"files         {s['files']:>12,}  {human(s['bytes']):>10}"
          f"   dirs {s['dirs']:,}  symlinks {s['symlinks']:,}")
    print(f"on local disk {s['local_files']:>12,}  {human(s['local_bytes']):>10}"
          f"   (bound {human(s['cache_size'])})")
    print(f"  dirty       {s['dirty_files']:>12,}  {human(s['dirty_bytes']):>10}"
          f"   (limit {human(s['dirty_limit'])})")
    print(f"remote-only   {s['remote_only_files']:>12,}  {human(s['remote_only_bytes']):>10}")
    print(f"cache         hits {s['hits']:,}  misses {s['misses']:,}  downloaded "
          f"{human(s['download_bytes'])}  evictions {s['evictions']:,}  "
          f"verify failures {s['verify_failures']:,}")
    print(f"journal       {s['journal_length']:,} pending jobs"
          + ("" if s.get("online") else "   (daemon not running)"))
    restarts = sum(t["restarts"] for t in s.get("tasks", {}).values())
    if restarts or s.get("quarantined"):
        failed = ", ".join(f"{n} {t['restarts']}" for n, t in s.get("tasks", {}).items()
                           if t["restarts"])
        print(f"problems      {s.get('quarantined', 0):,} quarantined (mirrorfs problems)"
              f"   task restarts {restarts:,}" + (f" ({failed})" if failed else ""))
    if s["mirrors"]:
        print()
        print(f"{'mirror':<14}{'state':<9}{'uploaded':>10}{'bytes':>12}{'pending':>9}"
              f"{'failed':>8}{'oldest':>8}  last success")
        for name, m in s["mirrors"].items():
            state = ("paused" if m["paused"] else "down" if m["up"] is False
                     else "up" if m["up"] else "offline")
            last = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["last_success"]))
                    if m["last_success"] else "never")
            print(f"{name:<14}{state:<9}{m['uploaded']:>10,}{human(m['uploaded_bytes']):>12}"
                  f"{m['pending']:>9,}{m['failed']:>8,}{age(m['oldest_pending_age']):>8}  "
                  f"{last}")
            if m.get("last_error") and state != "up":
                print(f"{'':<14}last error: {m['last_error']}")
            if m.get("paused"):
                since = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["paused_since"]))
                         if m.get("paused_since") else None)
                print(f"{'':<14}paused" + (f" since {since}" if since else "")
                      + (f" by {m['paused_by']}" if m.get("paused_by") else "")
                      + " (mirrorfs resume)")
            if m.get("audit_last"):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["audit_last"]))
                print(f"{'':<14}audit {when}: {m['audit_checked']:,} objects, missing "
                      f"{m['audit_missing']:,}, changed {m['audit_changed']:,}, stray "
                      f"{m['audit_stray']:,}, foreign {m['audit_foreign']:,}")
            if m.get("delayed_deletes"):
                print(f"{'':<14}{m['delayed_deletes']:,} deletes held by the delayed policy")


class Progress:
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, p: dict[str, Any]) -> None:
        text = "  ".join(f"{k} {v}" for k, v in p.items())
        if self.tty:
            sys.stderr.write("\r" + text[:120].ljust(60))
            sys.stderr.flush()
        elif time.monotonic() - self.last >= 1.0:
            print(text, file=sys.stderr, flush=True)
            self.last = time.monotonic()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def call(args: argparse.Namespace, cmd: str, **req: Any) -> Any:
    cfg, mp = locate(args)
    if "paths" in req:
        req["paths"] = rel_paths(req["paths"], mp)
    if "path" in req:
        req["path"] = rel_paths([req["path"]], mp)[0]
    progress = Progress()
    try:
        client = ControlClient(cfg.cache_dir, timeout=None)
    except OSError:
        return call_offline(cfg, cmd, req)
    try:
        return client.call(cmd, on_progress=progress, **req)
    except KeyboardInterrupt:
        raise AdminError("interrupted; rerun to continue") from None
    finally:
        progress.done()
        client.close()


def call_offline(cfg: Config, cmd: str, req: dict[str, Any]) -> Any:
    import trio

    # (imported here, not at the top: a command sent to a running daemon needs none of it)
    from mirrorfs.commands import OFFLINE
    from mirrorfs.daemon import Daemon
    from mirrorfs.mount import AlreadyMounted, lock_cache_dir, open_registry

    if cmd not in OFFLINE:
        raise AdminError(f"no running mirrorfs for {cfg.path} ({cmd} needs one)")

    try:
        lock = lock_cache_dir(cfg.cache_dir)
    except AlreadyMounted as exc:
        raise AdminError(f"{exc} but its control socket does not answer", EXIT_BUSY) from None
    db, reg, store, _clean = open_registry(cfg, mark_unclean=False)
    try:
        d = Daemon(cfg, "", db, reg, store, None)

        async def progress(p: dict[str, Any]) -> None:
            Progress()(p)

        return trio.run(OFFLINE[cmd], d, req, progress)
    finally:
        db.flush()
        db.close()
        os.close(lock)


def emit(args: argparse.Namespace, result: Any, text: str | None = None) -> None:
    if getattr(args, "json", False) or text is None:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


def run(args: argparse.Namespace) -> int:
    """Exit statuses (README): 0 ok, 1 problems found or a runtime failure, 2 bad usage or
    config, 3 busy."""
    try:
        return int(args.admin(args) or 0)
    except ConfigError as exc:
        print(f"mirrorfs: invalid config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise  # the reader of our output went away: main() ends quietly
    except (AdminError, CommandError, LookupError, ValueError, RuntimeError, OSError) as exc:
        print(f"mirrorfs {args.command}: {exc}", file=sys.stderr)
        if isinstance(exc, AdminError):
            return exc.status
        if isinstance(exc, CommandError):
            return EXIT_USAGE if exc.usage else EXIT_FAIL
        if isinstance(exc, LookupError | ValueError):  # offline: the command ran here
            return EXIT_USAGE
        return EXIT_FAIL


# ---------------------------------------------------------------- subcommands


def a_stats(args: argparse.Namespace) -> int:
    s = call(args, "stats")
    if args.prometheus or args.textfile:
        from mirrorfs.metrics import exposition, write_textfile

        if args.textfile:
            write_textfile(args.textfile, s)
        else:
            sys.stdout.write(exposition(s).decode())
    elif args.json:
        emit(args, s)
    else:
        print_stats(s)
    return 0


def a_queue(args: argparse.Namespace) -> int:
    q = call(args, "queue", mirror=args.mirror, limit=args.limit)
    if args.json:
        emit(args, q)
        return 0
    for item in q:
        due = time.strftime("%H:%M:%S", time.localtime(item["due"]))
        err = f"  ({item['error']})" if item["error"] else ""
        print(f"{item['mirror']:<12}{item['state']:<10}{due:<10}{item['attempts']:>3}  "
              f"{item['path'] or '(deleted)'}{err}")
    return 0


#: `verify` findings that are not faults (foreign objects are someone else's business)
VERIFY_FINE = ("ok", "no_reference", "repaired", "checked", "remote_foreign")


def verify_problems(result: dict[str, Any]) -> list[str]:
    """What ``verify`` found wrong: every non-empty list of its report but the fine ones
    (a kind of finding added later counts as a problem without a change here)."""
    return [k for k, v in result.items() if k not in VERIFY_FINE and isinstance(v, list) and v]


def simple(cmd: str, **fields: str) -> Any:
    def fn(args: argparse.Namespace) -> int:
        req = {k: getattr(args, v) for k, v in fields.items()}
        result = call(args, cmd, **req)
        bad: list[dict[str, str]] = []  # items a batch command skipped (import, move)
        if isinstance(result, dict):
            for k in ("skipped", "failed"):
                if isinstance(result.get(k), list):
                    bad += result[k] if args.json else result.pop(k)
        emit(args, result, None if args.json else " ".join(
            f"{k}: {v}" for k, v in result.items()) if isinstance(result, dict) else None)
        for item in bad:
            name = item.get("key", item.get("path", ""))
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            print(f"mirrorfs {cmd}: skipped '{shown}': {item['reason']}", file=sys.stderr)
        if cmd == "drain" and isinstance(result, dict) and not result.get("drained"):
            return EXIT_FAIL
        if cmd == "verify" and isinstance(result, dict) and verify_problems(result):
            return EXIT_FAIL
        return EXIT_FAIL if bad else EXIT_OK

    return fn


def a_state(args: argparse.Namespace) -> int:
    result = call(args, "state", paths=args.paths)
    if args.json:
        emit(args, result)
    else:
        for p, st in result.items():
            mirrors = ", ".join(f"{k}={v}" for k, v in st["mirrors"].items())
            print(f"{st['state']:<12}{p}  {mirrors}" + ("  pinned" if st.get("pinned") else ""))
    return 0


def a_pin(args: argparse.Namespace) -> int:
    r = call(args, "pin", paths=args.paths, fetch=args.fetch)
    if args.json:
        emit(args, r)
        return EXIT_OK
    print(f"pinned {r['pinned']} files" + (f"; downloaded {r['downloaded']}"
                                            if r.get("downloaded") else ""))
    if r.get("remote_only"):
        print(f"{r['remote_only']} of them are remote-only: each stays on local disk once it "
              "is read (pin --fetch downloads them now)")
    return EXIT_OK


def a_url(args: argparse.Namespace) -> int:
    result = call(args, "url", path=args.path, mirror=args.mirror)
    if args.json:
        emit(args, result)
        return 0
    urls = [u for u in result.values() if u]
    if not urls:
        print("mirrorfs url: no url_base configured for "
              + ", ".join(result), file=sys.stderr)
        return EXIT_USAGE
    for name, u in result.items():
        if u:
            print(u if len(result) == 1 else f"{name}\t{u}")
    return 0


def a_conflicts(args: argparse.Namespace) -> int:
    result = call(args, "conflicts")
    if args.json:
        emit(args, result)
        return 0
    for c in result:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"]))
        print(f"{when}  {c['path']}: {c['winner']} won; {c['loser']}'s version kept as "
              f"{c['conflict_path']}  (mirror {c['mirror']})")
    return 0


def a_problems(args: argparse.Namespace) -> int:
    result = call(args, "problems")
    if args.json:
        emit(args, result)
        return 0
    for p in result:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["time"]))
        where = f"line {p['line']}" if p["line"] else "whole object"
        print(f"{when}  {p['kind']} {p['object']} ({where}, mirror {p['mirror']}): "
              f"{p['problem']}")
    return 0


def add_admin_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def cmd(name: str, fn: Any, help: str, paths: bool = False,
            mirror: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("-c", "--config", help="the mount's config (default: found from the "
                       "current directory or the paths)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if paths:
            p.add_argument("paths", nargs="*", metavar="PATH")
        if mirror == "optional":
            p.add_argument("mirror", nargs="?", help="one mirror (default: all)")
        elif mirror == "required":
            p.add_argument("mirror")
        p.set_defaults(func=run, admin=fn)
        return p

    p = cmd("stats", a_stats, "files, cache and per-mirror statistics")
    p.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    p.add_argument("--textfile", metavar="FILE",
                   help="write the Prometheus text atomically to FILE (node_exporter's "
                   "textfile collector)")
    p = cmd("queue", a_queue, "pending and failed work per mirror")
    p.add_argument("--mirror")
    p.add_argument("--limit", type=int, default=1000)
    cmd("retry", simple("retry", mirror="mirror"), "retry failed items", mirror="optional")
    cmd("pause", simple("pause", mirror="mirror"), "pause uploads", mirror="optional")
    cmd("resume", simple("resume", mirror="mirror"), "resume uploads", mirror="optional")
    cmd("state", a_state, "per-file state (dirty, uploaded, remote-only...)", paths=True)
    p = cmd("evict", simple("evict", paths="paths", force="force"),
            "drop local copies of clean files", paths=True)
    p.add_argument("--force", action="store_true", help="also unpin")
    p = cmd("pin", a_pin, "keep files on local disk (remote-only ones once read)", paths=True)
    p.add_argument("--fetch", action="store_true",
                   help="download remote-only files now (needs the running mirrorfs)")
    cmd("unpin", simple("unpin", paths="paths"), "allow eviction again", paths=True)
    p = cmd("drain", simple("drain", timeout="timeout", deletes="deletes"),
            "upload everything now and wait until every mirror holds it (deletes held by "
            "delete_policy = \"delayed\" are reported, not carried out)")
    p.add_argument("--timeout", type=float)
    p.add_argument("--deletes", action="store_true",
                   help="also carry out deletes held by delete_policy = \"delayed\" now")
    p = cmd("move", simple("move", direction="direction", paths="paths"),
            "move files to the mirrors (evict) or to local disk (download and pin)",
            paths=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-remote", dest="direction", action="store_const", const="to-remote")
    g.add_argument("--to-local", dest="direction", action="store_const", const="to-local")
    p = cmd("backfill", simple("backfill", mirror="mirror", batch="batch"),
            "queue every existing file for a mirror (restartable)", mirror="required")
    p.add_argument("--batch", type=int, default=1000)
    p = cmd("import", simple("import", mirror="mirror", prefix="prefix", fast="fast",
                             batch="batch"),
            "register the objects a mirror already holds as remote-only files (restartable)",
            mirror="required")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--fast", action="store_true",
                   help="skip the per-object metadata request (no hashes: verified on first "
                   "download by size only)")
    p.add_argument("--batch", type=int, default=1000)
    p = cmd("verify", simple("verify", paths="paths", remote="remote", deep="deep",
                             repair="repair"),
            "recompute hashes of cached files; --remote checks the mirrors", paths=True)
    p.add_argument("--remote", action="store_true", help="check each mirror's copy")
    p.add_argument("--deep", action="store_true", help="with --remote: read whole objects")
    p.add_argument("--repair", action="store_true",
                   help="re-download bad cached copies, re-upload missing or bad mirror copies")
    cmd("pull", simple("pull", mirror="mirror"),
        "apply other nodes' changes now (mirrors with pull = true)", mirror="optional")
    cmd("conflicts", a_conflicts, "the conflict log: what lost, and where it was kept")
    cmd("problems", a_problems, "input from the mirrors that was quarantined (bad change-log "
        "records)")
    p = cmd("url", a_url, "public URL of a file on a mirror")
    p.add_argument("path")
    p.add_argument("mirror", nargs="?")
