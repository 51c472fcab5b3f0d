"""What the space keeper and the fetcher may know of the mirrors' runtime state: up or down,
paused or not. The uploader owns that state (``uploader.MirrorState``); this is a read-only
view of it, built before the services so that each is constructed with what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Rule(Protocol):
    @property
    def name(self) -> str: ...


class MirrorRuntime(Protocol):
    """One mirror's runtime state, as uploader.MirrorState holds it."""

    @property
    def rule(self) -> _Rule: ...

    @property
    def up(self) -> bool: ...

    @property
    def paused(self) -> bool: ...


class MirrorStatus:
    def __init__(self, mirrors: Sequence[MirrorRuntime]) -> None:
        self.mirrors = mirrors

    def is_up(self, name: str) -> bool:
        """Not found unreachable (at start or by its last transfer)."""
        return all(m.up for m in self.mirrors if m.rule.name == name)

    def can_upload(self) -> bool:
        """Some mirror is up and not paused: dirty files can become clean."""
        return any(m.up and not m.paused for m in self.mirrors)
