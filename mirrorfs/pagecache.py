"""Dropping a byte range of a file from the kernel's page cache of the mount.

Why: a cold read of a remote-only file fills two copies of it in memory, the cache file's and
the FUSE file's pages, and on VMs whose free memory goes back to the host (free-page
reporting, as on this project's machines) every fresh page costs ~10 us: a 1 GiB read paid
~1.5 s of CPU for them. Pages freed just before are cheap to take again. So a streamed read
drops the pages its reader has left behind (see Fetcher._drop_behind), and the next ones
reuse them; the bytes stay in the cache file. It is the drop-behind of ``RWF_DONTCACHE``.

How: ``pyfuse3.invalidate_inode`` drops a whole file only, and libfuse's
``fuse_lowlevel_notify_inval_inode`` (which takes a range) needs the session pointer pyfuse3
keeps to itself. The notification is one fixed message written to the session's /dev/fuse
descriptor (fuse_kernel.h: ``fuse_out_header`` with unique 0 and the notify code in the error
field, then ``fuse_notify_inval_inode_out``), which is what libfuse writes. A write to
/dev/fuse is one whole message, so this may run next to libfuse's replies.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

FUSE_NOTIFY_INVAL_INODE = 2
#: fuse_out_header {u32 len; i32 error; u64 unique} + {u64 ino; i64 off; i64 len}
_MSG = struct.Struct("<IiQQqq")


def session_fd() -> int | None:
    """This process's /dev/fuse descriptor: the daemon has exactly one (one mount)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    if len(found) != 1:
        log.info("page drop-behind off: %d /dev/fuse descriptors in this process", len(found))
        return None
    return found[0]


class PageDropper:
    """Drops ranges of a file's cached pages. ``drop`` blocks (the kernel may wait for a page
    under read, whose reply comes from the trio thread): call it from a worker thread."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    @property
    def enabled(self) -> bool:
        """False once the kernel refused a notification: readers then stop asking."""
        return self.fd is not None

    def drop(self, ino: int, off: int, length: int) -> None:
        fd = self.fd
        if fd is None or length <= 0:
            return
        try:
            os.write(fd, _MSG.pack(_MSG.size, FUSE_NOTIFY_INVAL_INODE, 0, ino, off, length))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return  # the kernel has forgotten the inode: it caches no pages of it
            log.info("page drop-behind off: the kernel refused a notification (%s)", exc)
            self.fd = None
