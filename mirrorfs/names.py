"""Which names and keys mirrorfs reserves for itself, and which object keys can be paths of
the mount: the one place these rules are written (remotes, import, pull, the change log and
the mirrors' include rules use them).

- ``.mirrorfs/`` at the top of a mirror holds mirrorfs's own objects (the multi-node change
  log): never a file of the mount, never uploaded, never imported.
- A path component starting with ``.mirrorfs-`` is one of our transfer temp files
  (:data:`TMP_PREFIX`) or probe objects (:data:`PROBE_PREFIX`): never listed as a file,
  never imported, refused as a key by the path-based mirrors.
- A key is a path of the mount only if it is relative, has no NUL, no empty, ``.`` or ``..``
  component, and no component over :data:`NAME_MAX` bytes.

Imports nothing of mirrorfs: every layer may use it.
"""

from __future__ import annotations

import os

NAME_MAX = 255
#: top-level directory of mirrorfs's own objects on a mirror
RESERVED = b".mirrorfs"
#: first characters of every name mirrorfs makes next to the files on a mirror
INTERNAL_PREFIX = ".mirrorfs-"
#: upload temp files: never listed, and refused as a key component
TMP_PREFIX = INTERNAL_PREFIX + "tmp-"
#: the objects ``Remote.probe()`` writes
PROBE_PREFIX = INTERNAL_PREFIX + "probe-"


def reserved(path: bytes) -> bool:
    """Paths under the mirrors' reserved prefix are mirrorfs's own, never files."""
    return path == RESERVED or path.startswith(RESERVED + b"/")


def safe_key(key: str) -> bytes | None:
    """The mount path for an object key, or None if the key cannot be a path inside the mount.

    Refused: empty keys, absolute keys, NUL, empty, ``.`` or ``..`` components (``a//b``
    included: mapping it to ``a/b`` could merge two objects), names over 255 bytes, and our
    own temporary and probe objects.
    """
    if not key or "\0" in key or key.startswith("/") or key.endswith("/"):
        return None
    raw = os.fsencode(key)
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") or len(p) > NAME_MAX for p in parts):
        return None
    if any(p.startswith(INTERNAL_PREFIX.encode()) for p in parts):
        return None
    return raw
