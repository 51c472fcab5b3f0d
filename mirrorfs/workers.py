"""Background tasks of a running mount, started in the nursery that :func:`mount.serve` owns.

Owns the :class:`Supervisor`: every long-lived task of the mount (the flush loop, the space
keeper, each mirror's upload scheduler and pull loop, the control socket, the stats flusher)
runs under it. A FUSE daemon that exits takes the application's files with it (ENOTCONN until
someone remounts), so an unexpected exception in one of these tasks is a bug to log, count and
survive: the task restarts after a backoff. Only unmount, a signal or a :class:`FatalError`
(the cache directory gone, the registry unusable) ends the nursery and so ``pyfuse3.main()``.

Builds the remotes, the uploader, the fetcher, the evictor and the control socket from the
daemon's config and starts each under the supervisor.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from mirrorfs.admin import file_state
from mirrorfs.audit import Auditor
from mirrorfs.cache.admin_ops import fold_deltas, paused_mirrors
from mirrorfs.cache.fetch import Fetcher
from mirrorfs.commands import COMMANDS
from mirrorfs.config import Config
from mirrorfs.control import serve_control
from mirrorfs.errors import ConfigError, FatalError
from mirrorfs.mirrors import MirrorStatus
from mirrorfs.pagecache import PageDropper, session_fd
from mirrorfs.probe import close_remotes, open_remotes, probe_all
from mirrorfs.pull import Sync
from mirrorfs.remotes.base import Remote
from mirrorfs.space import Space
from mirrorfs.stats import RuntimeStats
from mirrorfs.uploader import MirrorState, Uploader

if TYPE_CHECKING:
    from mirrorfs.daemon import Daemon

log = logging.getLogger(__name__)

#: first wait before a failed task runs again; doubled at each failure up to RESTART_MAX, and
#: back to RESTART_MIN once a run lasted STABLE_RUN seconds
RESTART_MIN, RESTART_MAX, STABLE_RUN = 0.1, 30.0, 60.0
#: set to 1 in a daemon's environment to enable the ``test-fail`` control command (tests only)
TEST_HOOKS_ENV = "MIRRORFS_TEST_HOOKS"


class InjectedFault(RuntimeError):
    """What ``test-fail`` makes a task raise: an unexpected exception, as a bug would."""


@dataclass
class TaskState:
    restarts: int = 0
    last_error: str = ""
    running: bool = False
    scope: trio.CancelScope | None = None
    inject: bool = False


class _StartedOnce:
    """The task_status of a task started with ``nursery.start``: a restarted run calls
    ``started()`` again, which the nursery must see only once."""

    def __init__(self, status: trio.TaskStatus[None]) -> None:
        self.status: trio.TaskStatus[None] | None = status

    def started(self, value: None = None) -> None:
        if self.status is not None:
            status, self.status = self.status, None
            status.started(value)


class Supervisor:
    """Runs long-lived tasks in one nursery and restarts the ones that fail.

    A task that returns is done. A task that raises is logged once with its traceback,
    counted (``stats``: ``tasks``; metrics: ``mirrorfs_task_restarts_total{task=...}``) and
    run again after a backoff. A FatalError, a failure of the health check (``health``
    raises FatalError) and the nursery's own cancellation are not caught: they end the
    mount."""

    def __init__(self, nursery: trio.Nursery,
                 health: Callable[[], None] = lambda: None) -> None:
        self.nursery = nursery
        self.health = health
        self.tasks: dict[str, TaskState] = {}

    def start_soon(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.tasks.setdefault(name, TaskState())
        self.nursery.start_soon(self._supervise, name, fn, args, False, name=name)

    async def start(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a task that reports readiness (``task_status.started()``) and wait for it.
        A failure before it is ready is not restarted: it fails the mount's start-up."""
        self.tasks.setdefault(name, TaskState())
        await self.nursery.start(self._supervise, name, fn, args, True, name=name)

    def inject(self, name: str) -> None:
        """Test seam: interrupt the running task ``name`` at its current checkpoint (its
        cleanup runs as for any exception) and make it fail with InjectedFault."""
        t = self.tasks.get(name)
        if t is None or t.scope is None:
            raise LookupError(f"no supervised task {name!r} is running "
                              f"(tasks: {', '.join(sorted(self.tasks))})")
        t.inject = True
        t.scope.cancel()

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: {"restarts": t.restarts, "last_error": t.last_error,
                       "running": t.running} for name, t in sorted(self.tasks.items())}

    async def _supervise(self, name: str, fn: Callable[..., Awaitable[Any]],
                         args: tuple[Any, ...], ready: bool,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        t = self.tasks[name]
        status = _StartedOnce(task_status)
        delay = RESTART_MIN
        while True:
            began = trio.current_time()
            try:
                t.running = True
                with trio.CancelScope() as scope:
                    t.scope = scope
                    if ready:
                        await fn(*args, task_status=status)
                    else:
                        status.started()
                        await fn(*args)
                    t.running = False
                    return  # done by itself
                if not t.inject:
                    return
                t.inject = False
                raise InjectedFault(f"fault injected into task {name} (test hook)")
            except BaseException as exc:
                t.running, t.scope = False, None
                if not _restartable(exc) or (ready and status.status is not None):
                    raise  # (a task that never got ready: the mount's start-up fails)
                try:
                    self.health()
                except FatalError as fatal:
                    log.critical("task %s failed and the daemon cannot go on: %s", name, fatal)
                    raise fatal from exc
                if trio.current_time() - began >= STABLE_RUN:
                    delay = RESTART_MIN
                t.restarts += 1
                t.last_error = f"{type(exc).__name__}: {exc}"
                log.error("task %s failed unexpectedly; restart %d in %.1f s", name,
                          t.restarts, delay, exc_info=exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)


def _restartable(exc: BaseException) -> bool:
    """An exception a task may be restarted after: not our own cancellation (shutdown), not
    KeyboardInterrupt/SystemExit, not a FatalError anywhere in an exception group."""
    if trio.current_effective_deadline() == -math.inf:
        return False  # the nursery is being cancelled: whatever the task raised, stop
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        return all(_restartable_leaf(e) for e in leaves) and \
            not all(isinstance(e, trio.Cancelled) for e in leaves)
    return _restartable_leaf(exc) and not isinstance(exc, trio.Cancelled)


def _restartable_leaf(exc: BaseException) -> bool:
    return not isinstance(exc, FatalError | KeyboardInterrupt | SystemExit | GeneratorExit)


def _leaves(exc: BaseException) -> Any:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def health_check(daemon: Daemon) -> None:
    """Raise FatalError when the daemon cannot go on: the cache directory is gone or the
    registry cannot be read. Called after a task failed, before it is restarted."""
    try:
        os.stat(daemon.store.root)
        with daemon.db.begin() as txn:
            txn.get(b"schema", db=daemon.db.db["meta"])
    except Exception as exc:
        raise FatalError(f"cache directory or registry unusable: {exc}") from exc


async def flush_stats(daemon: Daemon, stats: RuntimeStats) -> None:
    """Fold the in-memory hot-path counters into LMDB once a second."""
    while True:
        await trio.sleep(1.0)
        if stats.pending():
            fold_deltas(daemon.reg, stats)


def install_virtual_xattrs(daemon: Daemon) -> None:
    """``user.mirrorfs.state`` and ``user.mirrorfs.url.<mirror>`` on every regular file."""
    reg, ops = daemon.reg, daemon.ops
    assert ops is not None  # mounted only

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


async def start_workers(daemon: Daemon, sup: Supervisor) -> None:
    cfg, reg, store, ops = daemon.cfg, daemon.reg, daemon.store, daemon.ops
    assert ops is not None  # workers run in a mounted daemon only
    nursery = sup.nursery
    remotes = daemon.remotes
    probes = daemon.probes
    stats = RuntimeStats()
    daemon.stats = stats
    rules = {r.name: r for r in reg.mirrors}
    paused = paused_mirrors(reg)  # `mirrorfs pause` survives a remount
    states = [MirrorState(rule=rules[m.name], remote=remotes[m.name],
                          concurrency=m.concurrency, paused=cfg.paused or m.name in paused,
                          up=probes[m.name][0] == "ok", last_error=probes[m.name][1]
                          if probes[m.name][0] != "ok" else "")
              for m in cfg.mirrors]

    status = MirrorStatus(states)
    downloads: Mapping[int, object] = {}  # the fetcher's table, once it exists

    def busy(ino: int) -> bool:
        return ino in ops.open_files or ino in downloads

    space = Space(reg, store, stats, cache_size=cfg.cache_size, min_free=cfg.min_free,
                  dirty_limit=cfg.dirty_limit, is_busy=busy, is_up=status.is_up,
                  can_upload=status.can_upload)
    def kick_uploads() -> None:  # (Uploader.kick: the auditor is made before the uploader)
        for m in states:
            m.wake.set()

    # before any job runs: it reads the cut uploads' records
    auditor = Auditor(reg, cfg.mirrors, kick_uploads)
    daemon.auditor = auditor
    uploader = await Uploader.create(reg, store, ops, states, nursery, supervisor=sup,
                                     on_done=lambda ino: space.kick())
    daemon.uploader = uploader
    fuse_fd = None if cfg.stream_direct_io else session_fd()
    fetcher = Fetcher(reg, store, remotes, list(cfg.read_order), stats, nursery,
                      is_up=status.is_up, space=space, on_complete=space.touch,
                      dropper=PageDropper(fuse_fd) if fuse_fd is not None else None)
    downloads = fetcher.downloads
    daemon.fetcher = fetcher
    daemon.space = space
    ops.fetcher, ops.space, ops.stats = fetcher, space, stats
    install_virtual_xattrs(daemon)
    sup.start_soon("space", space.run)
    daemon.syncs = []
    for mcfg, mstate in zip(cfg.mirrors, states, strict=True):
        if mcfg.pull:
            mstate.publish = True
            sync = Sync(reg, store, ops, fetcher, uploader.kick, cfg.node_id, mcfg, mstate)
            daemon.syncs.append(sync)
            sup.start_soon(f"pull:{mcfg.name}", sync.run)
    for mstate in states:
        sup.start_soon(f"audit:{mstate.rule.name}", auditor.run, mstate)
    commands = dict(COMMANDS)
    if os.environ.get(TEST_HOOKS_ENV) == "1":
        log.warning("test hooks enabled (%s=1): the test-fail command can break tasks",
                    TEST_HOOKS_ENV)
        commands["test-fail"] = cmd_test_fail
    await sup.start("control", serve_control, daemon, commands)
    sup.start_soon("stats", flush_stats, daemon, stats)


async def cmd_test_fail(d: Daemon, req: dict[str, Any], progress: Any) -> Any:
    """Test seam (only with MIRRORFS_TEST_HOOKS=1): make a supervised task fail."""
    assert d.supervisor is not None
    before = d.supervisor.tasks[req["task"]].restarts if req["task"] in d.supervisor.tasks \
        else 0
    d.supervisor.inject(req["task"])
    return {"task": req["task"], "restarts_before": before}
