"""The LMDB environment: sub-databases, schema version, and the record codecs.

Owns the on-disk layout of the registry. Every sentinel value is documented here.

Sub-databases (all keys big-endian so that cursor order is numeric order):

``meta``      b"schema" -> version; b"next_ino" -> >Q no inode number at or above it was ever
              handed out (numbers are never reused; the registry reserves them in blocks,
              see Registry._new_ino, so a restart skips the rest of a block);
              b"paused:" + mirror name -> JSON {"since": unix time, "by": user}: uploads to
              that mirror paused by ``mirrorfs pause`` (survives a remount; resume deletes it).
              b"registry_id" -> 16 hex digits made with the registry, written into the
              metadata of every object we upload (``ObjectMeta.writer``; audit.py).
``inodes``    >Q ino -> :class:`Inode`.
``dentries``  >Q parent + name bytes -> >Q child ino.
``xattrs``    >Q ino + name bytes -> value bytes.
``chunks``    >Q ino -> >Q content version + N x 8-byte xxh3_64 digests, one per CHUNK_SIZE chunk
              of the content at that version (the whole-file hash lives in the inode).
``mirrors``   mirror name (utf-8) -> >H mirror index (stable across restarts and config edits).
``jobs``      >H mirror + >Q ino -> :class:`Job`: this mirror must be reconciled with this inode.
``queue``     >H mirror + >d due (wall clock) + >Q ino -> b"": jobs not claimed, by due time.
``links``     >Q ino + >Q parent + name bytes -> b"": every name of an inode that has more than
              one (hard links, nlink > 1). An inode with one name has no entry here: its name
              is ``Inode.parent``/``Inode.name``, which for a linked inode is one of these
              (its *primary* name, used where one path is enough: logs, URLs).
``remote``    >H mirror + >Q ino + path bytes -> :class:`RemoteCopy`: an object the mirror
              holds for the inode, one per key (a file with hard links has one per path the
              mirror wants). Records written before hard links existed are keyed by
              >H mirror + >Q ino alone; the path is in every value, so both read the same.
``rpath``     >H mirror + path bytes -> >Q ino: which inode owns the object at that path.
``counters``  name bytes -> >q, kept up to date in the same transaction as each change.
``cursors``   mirror identity -> bytes: pull/import cursors.
``conflicts`` >d time + >Q ino -> utf-8 JSON line.
``outbox``    >H mirror + >Q seq -> utf-8 JSON change record not yet published to the mirror's
              change log (multi-node; see mirrorfs/pull.py).
``pending``   >H mirror + >Q ino + key bytes -> kind (1 byte) + xxh3_128 (16 bytes): a step of
              a multi-step remote operation of that inode's job that is not finished yet. It
              is written in the transaction before the remote step and removed in the
              transaction after it, so that no object on a mirror is ever owned by nothing.
              (A key a file moved away from is not one: it stays in ``remote``, owned, until
              the job deletes it.) While an inode has one, its
              job is kept (a restart or a retry carries it out; see uploader._settle_pending):

              ``PEND_DELETE`` the object at this key must be deleted, unless another inode
              owns the key by then. The hash is the old object's. (Not written any more: an
              old key stays in ``remote``; a record found is still carried out.)
              ``PEND_UPLOAD`` an upload (or a server-side copy, for a hard link) to this key
              was started and is not recorded yet: if
              the inode no longer wants the key when the job runs again, whatever the upload
              left there is deleted (unless another inode owns the key).
              ``PEND_RENAME`` a server-side rename to this key was started (S3: copy, then
              delete the source; FTP: maybe delete the destination, then RNFR/RNTO): if the
              source (the inode's recorded key) still exists, what is here is a copy and is
              deleted; if not, the object here is the moved one and is adopted.
``problems``  b"pull:" + mirror identity + ":" + object key + b"\0" + >Q line (0: the whole
              object) -> utf-8 JSON: input from a mirror that was quarantined (pull.py).
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass, replace
from typing import Any

import lmdb

SCHEMA_VERSION = 1
ROOT_INO = 1

# Inode.local
LOCAL_NONE = 0  # content only on mirrors (remote-only)
LOCAL_FULL = 1  # content file complete and authoritative

# Inode.flags
F_OPEN_WRITE = 1  # a writer may have changed the content file since the last commit
F_PINNED = 2  # never evict
F_ORPHAN = 4  # unlinked; kept until last close and until every mirror dropped it
F_LOST = 8  # was dirty when its content file went missing: loud, never silently "fixed"

U64 = struct.Struct(">Q")
U16 = struct.Struct(">H")
I64 = struct.Struct(">q")
MQ = struct.Struct(">HQ")  # mirror + ino
MDQ = struct.Struct(">HdQ")  # mirror + due + ino
ZERO_HASH = b"\0" * 16

# kinds of ``pending`` records (see the module docstring)
PEND_DELETE = b"d"
PEND_UPLOAD = b"u"
PEND_RENAME = b"r"


@dataclass(slots=True)
class Inode:
    ino: int
    parent: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    ver: int = 0  # content version: +1 at each committed content change
    local: int = LOCAL_FULL
    flags: int = 0
    hash: bytes = ZERO_HASH  # xxh3_128 digest of the content at ``hash_ver``
    hash_ver: int = 0  # 0: no hash known
    name: bytes = b""
    target: bytes = b""  # symlink target

    _S = struct.Struct(">QQIIIIQqqqQQBB16sQHH")

    def pack(self) -> bytes:
        return self._S.pack(
            self.ino, self.parent, self.mode, self.uid, self.gid, self.nlink, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev, self.ver, self.local,
            self.flags, self.hash, self.hash_ver, len(self.name), len(self.target),
        ) + self.name + self.target

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Inode:
        f = cls._S.unpack_from(buf)
        off = cls._S.size
        name = bytes(buf[off:off + f[16]])
        target = bytes(buf[off + f[16]:off + f[16] + f[17]])
        return cls(*f[:16], name=name, target=target)  # type: ignore[misc]  # 16 fields

    def copy(self, **changes: Any) -> Inode:
        return replace(self, **changes)


# Job.state
JOB_PENDING = 0
JOB_CLAIMED = 1  # in flight in this daemon; reset to pending at startup (the lease ended)
JOB_FAILED = 2  # permanent error; waits for `retry` or for the next change of the file


@dataclass(slots=True)
class Job:
    due: float  # wall-clock time before which the job must not run
    seq: int  # bumped by every change that touches it: a claim that sees another seq redoes
    state: int = JOB_PENDING
    attempts: int = 0
    error: str = ""

    _S = struct.Struct(">dQBH")

    def pack(self) -> bytes:
        return self._S.pack(self.due, self.seq, self.state, self.attempts) + \
            self.error.encode("utf-8", "replace")[:1000]

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Job:
        due, seq, state, attempts = cls._S.unpack_from(buf)
        return cls(due, seq, state, attempts, bytes(buf[cls._S.size:]).decode("utf-8", "replace"))


@dataclass(slots=True)
class RemoteCopy:
    path: bytes  # the key the object has on the mirror (without the mirror's prefix)
    ver: int  # content version uploaded (0: unknown, e.g. imported)
    hash: bytes  # xxh3_128 digest of what was uploaded
    size: int
    mode: int
    mtime_ns: int

    _S = struct.Struct(">Q16sQIq")

    def pack(self) -> bytes:
        return self._S.pack(self.ver, self.hash, self.size, self.mode, self.mtime_ns) + self.path

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> RemoteCopy:
        ver, h, size, mode, mtime = cls._S.unpack_from(buf)
        return cls(bytes(buf[cls._S.size:]), ver, h, size, mode, mtime)


class Database:
    """The LMDB environment and its named sub-databases.

    Opened with sync off: a commit reaches the OS page cache (survives SIGKILL of the daemon);
    :meth:`flush` (called every second by the mount and on fsync) makes it durable on disk.
    """

    NAMES = ("meta", "inodes", "dentries", "xattrs", "chunks", "mirrors", "jobs", "queue",
             "remote", "rpath", "counters", "cursors", "conflicts", "outbox", "pending",
             "links", "problems")

    def __init__(self, path: str, readonly: bool = False, map_size: int = 1 << 36) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        # mode 0600: the registry holds every name, size and xattr of the mount, which the
        # mount's own permissions may hide from other users (lmdb's default is 0644)
        self.env = lmdb.open(path, map_size=map_size, max_dbs=len(self.NAMES) + 2,
                             sync=False, metasync=False, readonly=readonly, lock=True,
                             max_readers=256, mode=0o600)
        if not readonly:  # registries made before this was private
            for name in ("data.mdb", "lock.mdb"):
                os.chmod(os.path.join(path, name), 0o600)
        self.readonly = readonly
        self.db = {n: self.env.open_db(n.encode(), create=not readonly) for n in self.NAMES}
        if not readonly:
            self._init_schema()

    def _init_schema(self) -> None:
        with self.env.begin(write=True) as txn:
            v = txn.get(b"schema", db=self.db["meta"])
            if v is None:
                txn.put(b"schema", U64.pack(SCHEMA_VERSION), db=self.db["meta"])
                txn.put(b"next_ino", U64.pack(ROOT_INO + 1), db=self.db["meta"])
            elif U64.unpack(v)[0] != SCHEMA_VERSION:
                raise RuntimeError(f"registry schema {U64.unpack(v)[0]} is not supported "
                                   f"(this mirrorfs knows {SCHEMA_VERSION})")
            if txn.get(b"registry_id", db=self.db["meta"]) is None:
                txn.put(b"registry_id", secrets.token_hex(8).encode(), db=self.db["meta"])
        self.flush()

    @property
    def registry_id(self) -> str:
        with self.env.begin() as txn:
            v = txn.get(b"registry_id", db=self.db["meta"])
        return bytes(v).decode() if v else ""

    def begin(self, write: bool = False) -> lmdb.Transaction:
        return self.env.begin(write=write)

    def flush(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()


def get_counter(txn: lmdb.Transaction, db: Any, name: bytes) -> int:
    v = txn.get(name, db=db)
    return I64.unpack(v)[0] if v else 0


def bump_counter(txn: lmdb.Transaction, db: Any, name: bytes, delta: int) -> None:
    if delta:
        txn.put(name, I64.pack(get_counter(txn, db, name) + delta), db=db)


def set_counter(txn: lmdb.Transaction, db: Any, name: bytes, value: int) -> None:
    txn.put(name, I64.pack(value), db=db)
