"""Mirror implementations, by the ``type`` given in the config (a prefix map, as in S3QL)."""

from __future__ import annotations

from mirrorfs.remotes.base import Remote
from mirrorfs.remotes.dir import DirRemote
from mirrorfs.remotes.ftp import FtpRemote
from mirrorfs.remotes.s3 import S3Remote

REMOTE_CLASSES: dict[str, type[Remote]] = {
    "s3": S3Remote,
    "ftp": FtpRemote,
    "dir": DirRemote,
}

__all__ = ["REMOTE_CLASSES", "DirRemote", "FtpRemote", "Remote", "S3Remote"]
