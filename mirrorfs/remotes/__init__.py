"""Mirror implementations, by the ``type`` given in the config (a prefix map, as in S3QL).

Classes are imported on first use, so a mount with only directory mirrors never loads boto3.
"""

from __future__ import annotations

import importlib

from mirrorfs.remotes.base import Remote

_CLASSES = {
    "s3": ("mirrorfs.remotes.s3", "S3Remote"),
    "ftp": ("mirrorfs.remotes.ftp", "FtpRemote"),
    "dir": ("mirrorfs.remotes.dir", "DirRemote"),
}


def remote_class(kind: str) -> type[Remote]:
    module, name = _CLASSES[kind]
    cls: type[Remote] = getattr(importlib.import_module(module), name)
    return cls


KINDS = tuple(_CLASSES)

__all__ = ["KINDS", "Remote", "remote_class"]
