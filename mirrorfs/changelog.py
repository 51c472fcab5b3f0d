"""The change-log format of multi-node mirrors, and its one parser.

Owns the format of ``.mirrorfs/log/<node>/<first seq>-<last seq>.jsonl`` (written by
:meth:`pull.Sync.publish`, read by :meth:`pull.Sync.pull_log`). Everything in those objects
came from a mirror, which anyone with write access to the bucket or FTP account can change: it
is untrusted input. A record is applied only after :func:`parse_record` accepted it; a record
or an object that fails is quarantined by the puller (logged, counted, listed by
``mirrorfs problems``), skipped, and the cursor moves on, so one bad record cannot stop a node,
nor every node that pulls that mirror.

The schema, per record (one JSON object per line, UTF-8):

========  ========================================================================
``seq``   int, within the object's ``first..last`` range (always)
``op``    ``put``, ``rename`` or ``delete`` (always)
``path``  str: a relative path that :func:`names.safe_key` accepts, not under
          ``.mirrorfs``, at most MAX_PATH bytes (always)
``from``  the same rules (``rename`` only, required)
``hash``  32 lowercase hex digits, xxh3_128 (required for put and rename; optional, or null,
          for delete)
``prev``  null or 32 hex digits (``put`` only, optional)
``size``  int, 0..MAX_FILE_SIZE (put, rename)
``mtime`` int nanoseconds, signed 64-bit (put, rename)
``mode``  int, 0..0o7777 (put, rename; optional, default 0o644)
``chunks`` hex, exactly 16 digits per CHUNK_SIZE piece of ``size`` (``put`` only, optional)
========  ========================================================================

No other key is accepted: an unknown field means a format this node does not understand,
and guessing is how a record does something no node meant. Object names must have a node
name :func:`valid_node` accepts and a range of at most PUBLISH_BATCH sequence numbers; an
object over MAX_LOG_OBJECT bytes is never read into memory.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mirrorfs.errors import BadRecord
from mirrorfs.names import reserved, safe_key
from mirrorfs.remotes.base import CHUNK_SIZE, MAX_FILE_SIZE

#: most bytes of one change-log object read into memory; bigger ones are quarantined whole
MAX_LOG_OBJECT = 64 << 20
#: records per change-log object (the publisher writes batches of at most this many)
PUBLISH_BATCH = 1000
MAX_PATH = 4096
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

_HASH = re.compile(r"[0-9a-f]{32}")
_HEX = re.compile(r"[0-9a-f]*")

#: op -> (required keys, optional keys)
FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "put": (frozenset({"seq", "op", "path", "hash", "size", "mtime"}),
            frozenset({"mode", "prev", "chunks"})),
    "rename": (frozenset({"seq", "op", "path", "from", "hash", "size", "mtime"}),
               frozenset({"mode"})),
    "delete": (frozenset({"seq", "op", "path"}), frozenset({"hash"})),
}


def valid_node(node: str) -> bool:
    """A node name from an object key: it ends up in conflict file names."""
    return (0 < len(node.encode("utf-8", "surrogateescape")) <= 64 and node.isprintable()
            and node not in (".", ".."))


def check_range(first: int, last: int) -> None:
    if not 1 <= first <= last or last - first >= PUBLISH_BATCH:
        raise BadRecord(f"sequence range {first}-{last} is not one the publisher writes")


def _int(rec: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = rec[key]
    if type(v) is not int:  # bool is an int subclass: refused too
        raise BadRecord(f"{key} is {type(v).__name__}, not an integer")
    if not lo <= v <= hi:
        raise BadRecord(f"{key} {v} out of range {lo}..{hi}")
    return v


def _hash(rec: dict[str, Any], key: str, nullable: bool) -> None:
    v = rec.get(key)
    if v is None and nullable:
        return
    if not isinstance(v, str) or not _HASH.fullmatch(v):
        raise BadRecord(f"{key} is not 32 lowercase hex digits")


def _path(rec: dict[str, Any], key: str) -> None:
    v = rec[key]
    if not isinstance(v, str):
        raise BadRecord(f"{key} is {type(v).__name__}, not a string")
    raw = safe_key(v) if len(v) <= MAX_PATH else None
    if raw is None or len(raw) > MAX_PATH or reserved(raw):
        raise BadRecord(f"{key} {v[:100]!r} cannot be a path in the mount")


def nchunks(size: int) -> int:
    return max(1, -(-size // CHUNK_SIZE))


def parse_record(line: bytes, first: int, last: int) -> dict[str, Any]:
    """Check one line of a change-log object against the schema; return the record.

    Raises BadRecord naming the first problem found. A record it returns can be applied
    without any further check of types or ranges."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRecord(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(rec, dict):
        raise BadRecord(f"a JSON {type(rec).__name__}, not an object")
    op = rec.get("op")
    if not isinstance(op, str) or op not in FIELDS:
        raise BadRecord(f"unknown op {str(op)[:40]!r}")
    required, optional = FIELDS[op]
    missing = required - rec.keys()
    if missing:
        raise BadRecord(f"{op} record without {', '.join(sorted(missing))}")
    unknown = rec.keys() - required - optional
    if unknown:
        raise BadRecord(f"unknown field(s) {', '.join(sorted(k[:40] for k in unknown))}")
    _int(rec, "seq", first, last)
    _path(rec, "path")
    if op == "delete":
        _hash(rec, "hash", nullable=True)
        return rec
    _hash(rec, "hash", nullable=False)
    size = _int(rec, "size", 0, MAX_FILE_SIZE)
    _int(rec, "mtime", I64_MIN, I64_MAX)
    if "mode" in rec:
        _int(rec, "mode", 0, 0o7777)
    if op == "rename":
        _path(rec, "from")
        return rec
    _hash(rec, "prev", nullable=True)
    chunks = rec.get("chunks")
    if chunks is not None:
        if not isinstance(chunks, str) or len(chunks) != 16 * nchunks(size) \
                or not _HEX.fullmatch(chunks):
            raise BadRecord(f"chunks do not fit a file of {size} bytes")
    return rec
