"""Counters bumped on hot paths (reads, opens), kept in memory and added to LMDB each second.

Owns the in-memory deltas. Counters that change with metadata (files, bytes, jobs) are kept
in LMDB in the same transaction as the change (see registry); these ones would otherwise cost
an LMDB write per read, so the flush loop folds them in once a second.
"""

from __future__ import annotations

from collections import Counter

import lmdb

from mirrorfs.cache.db import bump_counter

NAMES = ("hits", "misses", "download_bytes", "downloads", "verify_failures", "evictions",
         "evicted_bytes", "whole_hash_downloads", "unverified_downloads", "read_errors")


class RuntimeStats:
    def __init__(self) -> None:
        self.delta: Counter[str] = Counter()

    def bump(self, name: str, n: int = 1) -> None:
        self.delta[name] += n

    def flush(self, txn: lmdb.Transaction, db: object) -> None:
        for name, n in self.delta.items():
            bump_counter(txn, db, name.encode(), n)
        self.delta.clear()

    def pending(self) -> bool:
        return bool(self.delta)
