"""The keys of one mirror that a task is working on (uploader, pull, audit).

Owns nothing persistent: a map key -> inode (0 for the audit's own deletes), kept in the trio
thread. Taking a key is synchronous (check and set with no checkpoint between); a task that
must wait for a key to be released waits on an event, set at every release.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class BusyKeys(dict[bytes, int]):
    """A dict, so the uploader's takes and releases stay plain item operations; every
    release (``del``, ``pop``) wakes the tasks waiting in :meth:`holding`."""

    def __init__(self) -> None:
        super().__init__()
        self._released = trio.Event()

    def _wake(self) -> None:
        self._released.set()
        self._released = trio.Event()

    def __delitem__(self, key: bytes) -> None:
        super().__delitem__(key)
        self._wake()

    def pop(self, key: bytes, *default: int | None) -> int | None:  # type: ignore[override]
        had = key in self
        out = super().pop(key, *default)
        if had:
            self._wake()
        return out

    @asynccontextmanager
    async def holding(self, key: bytes, ino: int) -> AsyncIterator[None]:
        """Wait until nobody else holds ``key``, take it for ``ino``, release it after."""
        while self.get(key, ino) != ino:
            await self._released.wait()
        self[key] = ino
        try:
            yield
        finally:
            self.pop(key, None)
