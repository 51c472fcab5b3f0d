"""Content files in the cache directory, named by inode number (the space they take is
accounted in LMDB counters and bounded by :mod:`mirrorfs.space`).

Owns ``<cache_dir>/data``. A file's content lives in ``data/<xx>/<ino hex>`` where ``xx`` is
the low byte of the inode number (keeps directories small). Renames never touch these files:
the name is in LMDB only. A download in progress lives in ``<name>.part`` and is renamed into
place once every chunk is verified, so a crash never leaves unverified bytes under the final
name. Paths are built from integers only: nothing a user names can point outside the cache.
"""

from __future__ import annotations

import contextlib
import os

TMP_SUFFIX = ".part"


class Store:
    def __init__(self, cache_dir: str) -> None:
        self.root = os.path.join(cache_dir, "data")
        os.makedirs(self.root, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(self.root, "%02x" % i), exist_ok=True)

    def path(self, ino: int) -> str:
        return os.path.join(self.root, "%02x" % (ino & 0xFF), "%x" % ino)

    def part_path(self, ino: int) -> str:
        return self.path(ino) + TMP_SUFFIX

    def open(self, ino: int, create: bool = False) -> int:
        """A read-write descriptor on the content file (O_NOFOLLOW: never a symlink)."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        return os.open(self.path(ino), flags, 0o600)

    def create_empty(self, ino: int) -> None:
        fd = os.open(self.path(ino), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def size(self, ino: int) -> int | None:
        try:
            return os.lstat(self.path(ino)).st_size
        except FileNotFoundError:
            return None

    def remove(self, ino: int, part: bool = True) -> None:
        """Remove the content file, and with ``part`` a download's ``.part`` file too (a
        caller that knows no download of ``ino`` runs saves an unlink per file)."""
        for p in (self.path(ino), self.part_path(ino)) if part else (self.path(ino),):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def iter_inos(self) -> list[tuple[int, str]]:
        """Every content file as (ino, path); used by the startup check and fsck."""
        out = []
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                base = name[:-len(TMP_SUFFIX)] if name.endswith(TMP_SUFFIX) else name
                try:
                    out.append((int(base, 16), entry.path))
                except ValueError:
                    continue
        return out
