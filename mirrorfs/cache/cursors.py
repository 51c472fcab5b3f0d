"""Resumable positions (the ``cursors`` db): where a pull, a listing pass, an import or a
backfill goes on after a restart.

Owns the ``cursors`` records. Keys are chosen by the caller (``pull:<identity>:node:<n>``,
``import:<mirror>:<prefix>``, ``backfill:<mirror>``); each function without a ``txn`` is one
write transaction. The ``*_txn`` ones run inside another named operation of cache/, so that
a position moves in the same transaction as the records it covers.
"""

from __future__ import annotations

import lmdb

from mirrorfs.cache.db import U64, Database


def get(db: Database, key: bytes) -> bytes | None:
    with db.begin() as txn:
        return get_txn(txn, db, key)


def get_txn(txn: lmdb.Transaction, db: Database, key: bytes) -> bytes | None:
    v = txn.get(key, db=db.db["cursors"])
    return bytes(v) if v is not None else None


def get_seq(db: Database, key: bytes) -> int:
    """A position that is a sequence number (0: none yet)."""
    v = get(db, key)
    return U64.unpack(v)[0] if v else 0


def set_txn(txn: lmdb.Transaction, db: Database, key: bytes, value: bytes | None) -> None:
    """Move the position (None: the pass is complete, the record goes)."""
    if value is None:
        txn.delete(key, db=db.db["cursors"])
    else:
        txn.put(key, value, db=db.db["cursors"])


def put(db: Database, key: bytes, value: bytes | None) -> None:
    with db.begin(write=True) as txn:
        set_txn(txn, db, key, value)


def advance(db: Database, key: bytes, seq: int) -> None:
    """Move a sequence position forward to ``seq`` (never back)."""
    with db.begin(write=True) as txn:
        v = get_txn(txn, db, key)
        if not v or U64.unpack(v)[0] < seq:
            set_txn(txn, db, key, U64.pack(seq))
