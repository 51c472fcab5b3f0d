"""Domain exceptions and the one place that turns them into errno values.

Every layer below the FUSE handlers (cache/, remotes/, the uploader, pull) raises these (or
OSError from the local disk); only :func:`to_errno`, called by the handler wrapper in fs.py,
decides what the kernel sees. An exception that is none of these is a bug: the handler
wrapper logs it with the operation and inode and answers EIO, so the mount survives.

Three failures that look alike to a reader are kept apart, because each needs a different
fix: :class:`NoGoodCopy` (no mirror has the bytes: a mirror problem), :class:`LocalDiskError`
(our own disk refused a write: a local problem) and :class:`RemoteUnavailable` (a mirror does
not answer). Each is logged with its own line.
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


class MirrorGone(RemoteUnavailable):
    """The mirror's container (an S3 bucket) does not exist. At mount time or in check-config
    that is a configuration error; once mounted it is a mirror that went away (deleted,
    being recreated, a provider's outage): its queue waits and resumes when it is back,
    instead of marking every file that meets it as failed."""


class PermanentRemoteError(MirrorfsError):
    """A failure that retrying will not fix (access denied, a name the mirror cannot store)."""


class InvalidKey(PermanentRemoteError):
    """A name that this mirror cannot store (CR/LF for FTP, over-long S3 keys, bad bytes)."""


class IntegrityError(MirrorfsError):
    """Downloaded bytes did not match the recorded xxhash."""


class NoGoodCopy(MirrorfsError):
    """No mirror has (verified) bytes of this version of the file: every source was tried,
    or none records it. The reader gets EIO."""


class LocalDiskError(MirrorfsError):
    """The local cache disk refused an operation (full, read-only, I/O error) while we were
    storing bytes that came from a mirror. Not the mirrors' fault: no other mirror is tried.
    Carries the disk's errno (ENOSPC for a full disk)."""

    def __init__(self, exc: OSError, what: str) -> None:
        super().__init__(f"local disk: {what}: {exc.strerror or exc}")
        self.errno = exc.errno or errno.EIO
        self.cause = exc


class BadRecord(MirrorfsError):
    """Input from a mirror (a change-log record, a change-log object) that fails its schema:
    quarantined and skipped, never applied."""


class FatalError(MirrorfsError):
    """The daemon cannot go on (the cache directory is gone, the registry is unusable): the
    supervisor does not restart the task, the mount ends."""


def to_errno(exc: BaseException) -> int:
    """Map a domain error or OSError to the errno the kernel should see."""
    if isinstance(exc, MirrorfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
