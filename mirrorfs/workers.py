"""Background tasks of a running mount, started in the mount's nursery.

Owns nothing itself: it builds the remotes, the uploader, the evictor and the control socket
from the daemon's config and starts each in the nursery that :func:`mount.serve` owns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from mirrorfs.mount import Daemon


async def start_workers(daemon: Daemon, nursery: trio.Nursery) -> None:
    return None
