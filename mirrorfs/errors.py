"""Domain exceptions and the one place that turns them into errno values.

Every layer below the FUSE handlers raises these (or OSError from the local disk); only
:func:`to_errno` decides what the kernel sees. An exception that is none of these is a bug: the
handler wrapper logs it with the path and answers EIO, so the mount survives.
"""

from __future__ import annotations

import errno


class MirrorfsError(Exception):
    """Base of every domain error."""

    errno: int = errno.EIO


class ConfigError(MirrorfsError):
    """The configuration is invalid; ``str()`` is the one line shown to the user."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


class NotFound(MirrorfsError):
    """The object or entry does not exist (locally or on a mirror)."""

    errno = errno.ENOENT


class RemoteChanged(MirrorfsError):
    """The object on the mirror is not the one we recorded (size, hash or etag differ)."""

    errno = errno.ESTALE


class CacheFull(MirrorfsError):
    """No room in the cache for new data, and nothing clean left to evict."""

    errno = errno.ENOSPC


class RemoteError(MirrorfsError):
    """A transient failure talking to a mirror: retried with backoff."""


class RemoteUnavailable(RemoteError):
    """The mirror does not answer at all (connection refused, timeout)."""


class PermanentRemoteError(MirrorfsError):
    """A failure that retrying will not fix (access denied, bucket missing)."""


class InvalidKey(PermanentRemoteError):
    """A name that this mirror cannot store (CR/LF for FTP, over-long S3 keys, bad bytes)."""


class IntegrityError(MirrorfsError):
    """Downloaded bytes did not match the recorded xxhash."""


def to_errno(exc: BaseException) -> int:
    """Map a domain error or OSError to the errno the kernel should see."""
    if isinstance(exc, MirrorfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
