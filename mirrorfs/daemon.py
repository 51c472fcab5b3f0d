"""The typed object a running mount (or an offline admin command) is: what each service may
reach of the others.

Owns nothing itself: mount.py fills it in its start-up steps (workers.py starts the services),
the control socket hands it to admin commands. Services that exist only in a mounted daemon are
None offline; :func:`live` is how a command that needs one says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from mirrorfs.cache.db import Database
from mirrorfs.cache.registry import Registry
from mirrorfs.cache.store import Store
from mirrorfs.config import Config

if TYPE_CHECKING:
    from mirrorfs.audit import Auditor
    from mirrorfs.cache.fetch import Fetcher
    from mirrorfs.fs import Operations
    from mirrorfs.pull import Sync
    from mirrorfs.remotes.base import Remote
    from mirrorfs.space import Space
    from mirrorfs.stats import RuntimeStats
    from mirrorfs.uploader import Uploader
    from mirrorfs.workers import Supervisor

T = TypeVar("T")


def live(service: T | None, command: str) -> T:
    """A service of the running daemon (None offline, where a command needing it stops)."""
    if service is None:
        raise RuntimeError(f"{command} needs the running mirrorfs (mount it first)")
    return service


@dataclass
class Daemon:
    """Everything a running mount holds; the control socket and tests reach it through here."""

    cfg: Config
    mountpoint: str
    db: Database
    reg: Registry
    store: Store
    ops: Operations | None  # None offline (admin commands on an unmounted cache)
    remotes: dict[str, Remote] = field(default_factory=dict)
    uploader: Uploader | None = None
    fetcher: Fetcher | None = None
    space: Space | None = None
    stats: RuntimeStats | None = None
    #: mirror -> ("ok" | "unreachable" | "error", detail, seconds) of the start-up probe
    probes: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    syncs: list[Sync] = field(default_factory=list)
    auditor: Auditor | None = None
    supervisor: Supervisor | None = None  # restarts failed tasks, counts restarts
    stopping: bool = False
