"""xxhash of whole files and of their fixed-size chunks, computed in one pass.

The whole-file digest (xxh3_128) goes into object metadata and the registry; the per-chunk
digests (xxh3_64 of each CHUNK_SIZE piece) are what a streamed read is verified against.
These functions block: callers run them in ``trio.to_thread.run_sync`` with the hash limiter.
"""

from __future__ import annotations

import os

import xxhash

from mirrorfs.remotes.base import CHUNK_SIZE

BLOCK = 1 << 20


def read_and_hash(path: str, keep_upto: int) -> tuple[str, bytes, int, bytes | None]:
    """(xxh3_128 hex, concatenated 8-byte chunk digests, size, content) of the file at path;
    the content only if it has at most ``keep_upto`` bytes (else None): a small file is read
    once for both its hashes and its upload."""
    whole = xxhash.xxh3_128()
    chunks = bytearray()
    size = 0
    # O_NOFOLLOW: a content file swapped for a symlink must not send a file from elsewhere
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb",
              buffering=0) as f:
        if keep_upto and os.fstat(f.fileno()).st_size <= keep_upto:
            data = f.read(keep_upto + 1)
            if len(data) <= keep_upto:
                return (xxhash.xxh3_128_hexdigest(data),
                        xxhash.xxh3_64_digest(data) if len(data) <= CHUNK_SIZE else
                        b"".join(xxhash.xxh3_64_digest(data[i:i + CHUNK_SIZE])
                                 for i in range(0, len(data), CHUNK_SIZE)),
                        len(data), data)
            f.seek(0)
        while True:
            chunk = f.read(CHUNK_SIZE)
            if not chunk:
                break
            whole.update(chunk)
            chunks += xxhash.xxh3_64_digest(chunk)
            size += len(chunk)
    if size == 0:
        chunks += xxhash.xxh3_64_digest(b"")
    return whole.hexdigest(), bytes(chunks), size, None


def chunk_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_64_digest(data)


def file_digest(path: str) -> str:
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            b = os.read(fd, BLOCK)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()
