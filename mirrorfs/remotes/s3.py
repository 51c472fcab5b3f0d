"""An S3 bucket (AWS or any S3-compatible server) as a mirror, through boto3.

Owns one boto3 client per mirror (thread-safe, created on first use) and two CapacityLimiters:
``_limiter`` bounds the threads blocked in boto3 and botocore's connection pool has room for
all of them plus the streams being read, so a thread never waits for a connection inside
boto3; ``_disk_limiter`` bounds the threads reading the local file for an upload. Every
botocore exception is translated here (``_translate``), so nothing above this module ever
sees one.

One object per key, under ``prefix``, with ObjectMeta as user metadata: the bucket stays
readable as plain files by a web server or CDN.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import unquote

import boto3
import botocore.config
import botocore.exceptions as bce
import trio
import xxhash

from mirrorfs.config import mirror_defaults
from mirrorfs.errors import (
    InvalidKey,
    MirrorfsError,
    MirrorGone,
    NotFound,
    PermanentRemoteError,
    RemoteChanged,
    RemoteError,
    RemoteUnavailable,
)
from mirrorfs.remotes.base import (
    META_HASH,
    META_SIZE,
    PROBE_PREFIX,
    ListPage,
    ObjectMeta,
    PutResult,
    ReadStream,
    Remote,
    RemoteStat,
    quote_key,
    retry,
)
from mirrorfs.seams import crash_point

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
GiB = 1024 * MiB
#: Bytes per read() of a ReadStream.
READ_BLOCK = MiB
#: The largest content the uploader hands over in memory (read and hashed once, see
#: Remote.put_data); bigger files are read by ``put`` itself, as a stream or in parts.
INLINE_PUT_MAX = 8 * MiB
#: Pooled connections beyond the thread limiter: an open ReadStream holds one between its
#: reads, outside the limiter (one per download in progress).
STREAM_CONNECTIONS = 16
#: S3's limits: smallest part but the last, most parts, largest single PUT or copy.
MIN_PART = 5 * MiB
MAX_PARTS = 10_000
MAX_SINGLE = 5 * GiB

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
               "AccountProblem", "InvalidToken", "ExpiredToken", "InvalidSecurity",
               "NotSignedUp", "AuthorizationHeaderMalformed"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
                    "TooManyRequestsException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "RequestTimeTooSkewed", "BadDigest",
                    "OperationAborted", "NoSuchUpload"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"


def _single_error(eg: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The error to report for a nursery whose tasks failed, or None if it was cancelled."""
    if eg.subgroup(trio.Cancelled) is not None:
        return None
    leaf: BaseException = eg
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


class _S3ReadStream(ReadStream):
    """A ranged GET, pulled ~1 MiB per read() in this mirror's threads."""

    def __init__(self, remote: S3Remote, key: str, start: int, length: int | None) -> None:
        self._remote = remote
        self._key = key
        self._start = start
        self._length = length
        self._body: Any = None
        self._done = length == 0
        self._error: BaseException | None = None

    async def __aenter__(self) -> ReadStream:
        await self._open()
        return self

    async def _open(self) -> None:
        if self._body is None and not self._done:
            self._body = await self._remote._get(self._key, self._start, self._length)
            if self._body is None:
                self._done = True

    async def read(self) -> bytes:
        if self._error is not None:
            # The body is broken; reading on must not look like a clean end of file.
            raise RemoteError(f"{self._remote._where()}: download of {self._key} failed "
                              f"earlier: {self._error}")
        await self._open()
        if self._done:
            return b""
        try:
            data: bytes = await self._remote._run(f"read {self._key}", self._body.read,
                                                  READ_BLOCK)
        except BaseException as exc:
            self._error = exc
            raise
        if not data:
            self._done = True
            await self.aclose()
        return data

    async def readinto(self, buf: memoryview) -> int:
        """Receive straight into ``buf`` (one thread hop per call, not per MiB)."""
        if self._spill:
            return await super().readinto(buf)
        if self._error is not None:
            raise RemoteError(f"{self._remote._where()}: download of {self._key} failed "
                              f"earlier: {self._error}")
        await self._open()
        if self._done:
            return 0
        try:
            n: int = await self._remote._run(f"read {self._key}", _fill, self._body, buf)
        except BaseException as exc:
            self._error = exc
            raise
        if n < len(buf):
            self._done = True
            await self.aclose()
        return n

    async def aclose(self) -> None:
        self._done = True
        body, self._body = self._body, None
        if body is not None:
            await trio.to_thread.run_sync(body.close)


class S3Remote(Remote):
    """Mirror into ``bucket`` under ``prefix``; see the module docstring."""

    #: Objects larger than this are copied (rename, update_meta) part by part.
    copy_limit = MAX_SINGLE
    #: Part size of such multipart copies.
    copy_part_size = 512 * MiB

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        options = {**mirror_defaults("s3"), **options}
        self.name = name
        self.bucket: str = options["bucket"]
        self.prefix: str = options["prefix"]
        self.concurrency = max(1, int(options["concurrency"]))
        self.multipart_threshold = min(int(options["multipart_threshold"]), MAX_SINGLE)
        self.multipart_chunksize = max(int(options["multipart_chunksize"]), MIN_PART)
        self.inline_put_limit = min(self.multipart_threshold, INLINE_PUT_MAX)
        self.jobs_ahead = self.concurrency  # requests wait for ``_limiter``, not for us
        self.storage_class: str | None = options.get("storage_class")
        self.url_base: str | None = options.get("url_base")
        #: Parts of one upload in flight at once (boto3's transfer manager sends 10).
        self.part_uploaders = self.concurrency
        self._part_slots = trio.Semaphore(self.concurrency + 1)
        self._options = options
        self._limiter = trio.CapacityLimiter(self.concurrency)
        self._disk_limiter = trio.CapacityLimiter(2)
        self._client: Any = None
        self._client_lock = threading.Lock()
        #: multipart uploads (and copies) this process has in flight: never cleaned up
        self._active_uploads: set[str] = set()

    # -- plumbing --------------------------------------------------------------------------

    def _where(self) -> str:
        return f"mirror {self.name} (s3://{self.bucket}/{self.prefix})"

    def _make_client(self) -> Any:
        o = self._options
        session = boto3.session.Session(
            aws_access_key_id=o.get("access_key_id"),
            aws_secret_access_key=o.get("secret_access_key"),
            aws_session_token=o.get("session_token"),
            profile_name=o.get("profile"),
            region_name=o["region"],
        )
        cfg: dict[str, Any] = {
            "max_pool_connections": self.concurrency + STREAM_CONNECTIONS,
            # One retry policy, ours (@retry): botocore's own would multiply the attempts.
            "retries": {"mode": "standard", "total_max_attempts": 1},
            "s3": {"addressing_style": o["addressing_style"]},
            "connect_timeout": o["connect_timeout"],
            "read_timeout": o["read_timeout"],
            "user_agent_extra": "mirrorfs",
        }
        for name in ("signature_version", "request_checksum_calculation",
                     "response_checksum_validation"):
            if o.get(name):
                cfg[name] = o[name]
        verify: bool | str | None = None  # None: botocore's default (AWS_CA_BUNDLE, config)
        if o.get("ca_bundle"):
            verify = o["ca_bundle"]
        elif not o["verify_tls"]:
            log.info("%s: TLS certificate verification is off", self._where())
            verify = False
        log.debug("%s: new client for endpoint %s", self._where(), o.get("endpoint_url"))
        return session.client("s3", endpoint_url=o.get("endpoint_url"),
                              config=botocore.config.Config(**cfg), verify=verify)

    def _get_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _translate(self, exc: Exception, what: str) -> Exception:
        """The domain error for a botocore (or urllib3) failure of ``what``."""
        where = f"{self._where()}: {what}"
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            text = f"{where}: {code or status} {err.get('Message') or ''}".rstrip()
            if code == "NoSuchBucket":
                return MirrorGone(f"{where}: bucket {self.bucket!r} does not exist")
            if code in _NOT_FOUND_CODES or status == 404:
                return NotFound(text)
            if code in _AUTH_CODES or status in (401, 403):
                return PermanentRemoteError(f"{text} (check the credentials and the bucket "
                                            "policy)")
            if code in ("PreconditionFailed",) or status == 412:
                return RemoteChanged(text)
            if code == "KeyTooLongError":
                return InvalidKey(text)
            if code in _TRANSIENT_CODES or status == 429 or status >= 500:
                return RemoteError(text)
            if status == 301 or code in ("PermanentRedirect", "IllegalLocationConstraint"):
                return PermanentRemoteError(f"{text} (wrong region or endpoint?)")
            if 400 <= status < 500:
                return PermanentRemoteError(text)
            return RemoteError(text)
        if isinstance(exc, bce.SSLError):
            return PermanentRemoteError(f"{where}: TLS error (check ca_bundle/verify_tls): "
                                        f"{exc}")
        if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError,
                            bce.ConnectionClosedError, bce.ReadTimeoutError,
                            bce.ProxyConnectionError)):
            return RemoteUnavailable(f"{where}: {exc}")
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError,
                            bce.ProfileNotFound, bce.NoRegionError)):
            return PermanentRemoteError(f"{where}: {exc}")
        if isinstance(exc, bce.ParamValidationError):
            return PermanentRemoteError(f"{where}: invalid request: {exc}")
        if isinstance(exc, (bce.BotoCoreError, OSError)):
            return RemoteError(f"{where}: {exc}")
        try:
            import urllib3.exceptions
        except ImportError:  # pragma: no cover - botocore always brings urllib3
            return exc
        if isinstance(exc, urllib3.exceptions.HTTPError):
            return RemoteError(f"{where}: {exc}")
        return exc

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call blocking boto3 code in a thread of this mirror; errors come back translated."""
        def call() -> T:
            try:
                return fn(*args, **kwargs)
            except MirrorfsError:
                raise
            except Exception as exc:
                raise self._translate(exc, what) from exc

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def _s3(self, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 API call by name (``put_object``...), with the bucket filled in."""
        def call() -> dict[str, Any]:
            result: dict[str, Any] = getattr(self._get_client(), op)(Bucket=self.bucket,
                                                                      **kwargs)
            return result

        return await self._run(what, call)

    def _storage(self) -> dict[str, str]:
        return {"StorageClass": self.storage_class} if self.storage_class else {}

    def _part_checksum(self) -> dict[str, str]:
        """CRC32 per part, as boto3's own transfer manager asks for, unless checksums are
        limited to what an operation requires (providers that reject them).

        A multipart upload created without an algorithm leaves the server to compute a
        whole-object checksum at completion (moto does it in Python: 1 GiB took ~10 s); with
        CRC32 per part it combines the parts' checksums instead. Call it in a worker thread:
        the first call makes the boto3 client.
        """
        mode = self._get_client().meta.config.request_checksum_calculation
        return {"ChecksumAlgorithm": "CRC32"} if mode == "when_supported" else {}

    def _full(self, key: str) -> str:
        self.check_key(key)
        return self.prefix + key

    # -- the Remote interface --------------------------------------------------------------

    def check_key(self, key: str) -> None:
        if not key:
            raise InvalidKey("empty key")
        try:
            encoded = (self.prefix + key).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidKey(f"S3 cannot store {key!r}: the name is not valid UTF-8 (the local "
                             "file name has bytes that are not UTF-8)") from None
        if len(encoded) > 1024:
            raise InvalidKey(f"S3 cannot store {key[:60]!r}...: prefix and key take "
                             f"{len(encoded)} bytes in UTF-8, S3 allows at most 1024")

    @retry()
    async def put(self, key: str, local_path: str, meta: ObjectMeta) -> PutResult:
        full = self._full(key)
        small = await trio.to_thread.run_sync(_read_small, local_path, self.multipart_threshold,
                                              limiter=self._disk_limiter)
        if small is None:
            return await self._put_multipart(full, local_path, meta)
        data, digest = small
        return await self._put_object(key, data, replace(meta, size=len(data), xxhash=digest))

    @retry()
    async def put_data(self, key: str, data: bytes, meta: ObjectMeta) -> PutResult:
        if len(data) > self.multipart_threshold:
            raise ValueError(f"put_data of {len(data)} bytes: over the multipart threshold")
        return await self._put_object(key, data, replace(meta, size=len(data)))

    async def _put_object(self, key: str, data: bytes, meta: ObjectMeta) -> PutResult:
        """One PutObject of ``data``, whose hash ``meta.xxhash`` is."""
        assert meta.xxhash is not None
        resp = await self._s3("put_object", f"put {key}", Key=self._full(key), Body=data,
                              Metadata=meta.as_dict(), ContentType=_content_type(key),
                              **self._storage())
        return PutResult(size=len(data), xxhash=meta.xxhash, etag=_etag(resp.get("ETag")))

    async def _put_multipart(self, full: str, local_path: str, meta: ObjectMeta) -> PutResult:
        """Upload in parts read in order (hashed on the way), a few in flight at once.

        The metadata is set when the upload is created, before the hash is known, so it
        carries the caller's hash; the caller compares it with the returned one.
        """
        fd = await trio.to_thread.run_sync(os.open, local_path,
                                           os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                           limiter=self._disk_limiter)
        try:
            size = os.fstat(fd).st_size
            part_size = max(self.multipart_chunksize, math.ceil(size / MAX_PARTS))
            checksum = await self._run(f"put {full}", self._part_checksum)
            resp = await self._s3("create_multipart_upload", f"put {full}", Key=full,
                                  Metadata=meta.as_dict(), ContentType=_content_type(full),
                                  **self._storage(), **checksum)
            upload_id = resp["UploadId"]
            self._active_uploads.add(upload_id)
            try:
                parts: dict[int, dict[str, str]] = {}
                hasher = xxhash.xxh3_128()
                total = await self._send_parts(full, upload_id, fd, part_size, hasher, parts,
                                               checksum)
                done = await self._complete(full, upload_id, parts, f"put {full}")
            except BaseException:
                await self._abort(full, upload_id, f"upload of {full}")
                raise
            finally:
                self._active_uploads.discard(upload_id)
        finally:
            os.close(fd)
        return PutResult(size=total, xxhash=hasher.hexdigest(), etag=_etag(done.get("ETag")))

    async def _send_parts(self, full: str, upload_id: str, fd: int, part_size: int,
                          hasher: Any, parts: dict[int, dict[str, str]],
                          checksum: dict[str, str]) -> int:
        """Read parts in order and hand them to ``part_uploaders`` tasks; returns bytes sent.

        A part is read only with one of the mirror's ``_part_slots``, given back once it is
        sent: all uploads of this mirror together hold at most ``concurrency + 1`` parts in
        memory, however many run at once.
        """
        send, recv = trio.open_memory_channel[tuple[int, bytes]](0)
        total = 0
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.part_uploaders):
                    nursery.start_soon(self._part_worker, full, upload_id, recv.clone(), parts,
                                       checksum)
                recv.close()
                async with send:
                    number = 1
                    while True:
                        await self._part_slots.acquire()
                        try:
                            data = await trio.to_thread.run_sync(
                                _read_part, fd, total, part_size, hasher,
                                limiter=self._disk_limiter)
                            if not data and number > 1:
                                self._part_slots.release()
                                break
                            await send.send((number, data))
                        except BaseException:
                            self._part_slots.release()  # not handed over
                            raise
                        total += len(data)
                        number += 1
                        if len(data) < part_size:
                            break
        except BaseExceptionGroup as eg:
            err = _single_error(eg)
            if err is None:
                raise
            raise err from None
        return total

    async def _part_worker(self, full: str, upload_id: str,
                           recv: trio.MemoryReceiveChannel[tuple[int, bytes]],
                           parts: dict[int, dict[str, str]],
                           checksum: dict[str, str]) -> None:
        async with recv:
            async for number, data in recv:
                try:
                    parts[number] = await self._upload_part(full, upload_id, number, data,
                                                            checksum)
                finally:
                    self._part_slots.release()

    @retry(attempts=3)
    async def _upload_part(self, full: str, upload_id: str, number: int, data: bytes,
                           checksum: dict[str, str]) -> dict[str, str]:
        """The part's entry for CompleteMultipartUpload: its ETag and checksum if any."""
        resp = await self._s3("upload_part", f"put {full} part {number}", Key=full,
                              UploadId=upload_id, PartNumber=number, Body=data, **checksum)
        entry = {"ETag": str(resp["ETag"])}
        if checksum and resp.get("ChecksumCRC32"):
            entry["ChecksumCRC32"] = str(resp["ChecksumCRC32"])
        return entry

    async def _complete(self, full: str, upload_id: str, parts: dict[int, dict[str, str]],
                        what: str) -> dict[str, Any]:
        return await self._s3("complete_multipart_upload", what, Key=full, UploadId=upload_id,
                              MultipartUpload={"Parts": [{"PartNumber": n, **parts[n]}
                                                         for n in sorted(parts)]})

    async def _abort(self, full: str, upload_id: str, what: str) -> None:
        """Abort a multipart upload or copy (shielded: runs on cancellation too)."""
        with trio.CancelScope(shield=True):
            try:
                await self._s3("abort_multipart_upload", f"abort {what}", Key=full,
                               UploadId=upload_id)
            except MirrorfsError as exc:
                log.warning("%s: could not abort %s (%s): %s", self._where(), what, upload_id,
                            exc)

    def open_read(self, key: str, start: int = 0, length: int | None = None) -> ReadStream:
        self.check_key(key)
        return _S3ReadStream(self, key, start, length)

    @retry()
    async def _get(self, key: str, start: int, length: int | None) -> Any:
        """The StreamingBody of a ranged GET, or None if the range starts past the end."""
        kwargs: dict[str, Any] = {}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            kwargs["Range"] = f"bytes={start}-{end}"
        full = self._full(key)

        def call() -> Any:
            try:
                return self._get_client().get_object(Bucket=self.bucket, Key=full,
                                                     **kwargs)["Body"]
            except bce.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return None  # the range starts at or past the end: nothing to read
                raise

        return await self._run(f"read {key}", call)

    @retry()
    async def delete(self, key: str) -> None:
        await self._s3("delete_object", f"delete {key}", Key=self._full(key))

    @retry()
    async def rename(self, src: str, dst: str, size: int | None = None) -> None:
        """Server-side copy (metadata kept), then delete the source."""
        if self._full(src) == self._full(dst):
            return
        await self._copy_key(src, dst, size)
        crash_point("s3-copied")
        await self._s3("delete_object", f"rename {src}", Key=self._full(src))

    server_copy = True

    @retry()
    async def copy(self, src: str, dst: str, size: int | None = None) -> None:
        if self._full(src) != self._full(dst):
            await self._copy_key(src, dst, size)

    async def _copy_key(self, src: str, dst: str, size: int | None) -> None:
        """CopyObject with the metadata kept: one request when the size is known to be under
        the single-copy limit, a HEAD and a multipart copy otherwise. Not retried here: the
        public operation that calls it is."""
        sfull, dfull = self._full(src), self._full(dst)
        if size is not None and size <= self.copy_limit:
            await self._s3("copy_object", f"copy {sfull} to {dfull}", Key=dfull,
                           CopySource={"Bucket": self.bucket, "Key": sfull},
                           MetadataDirective="COPY", **self._storage())
            return
        head = await self._s3("head_object", f"copy {src}", Key=sfull)
        await self._copy(sfull, dfull, head, None)

    async def _copy(self, sfull: str, dfull: str, head: dict[str, Any],
                    meta: ObjectMeta | None) -> None:
        """Copy an object server-side; ``meta`` replaces the metadata if given."""
        source = {"Bucket": self.bucket, "Key": sfull}
        content_type = head.get("ContentType") or _content_type(dfull)
        directive: dict[str, Any]
        if meta is None:
            directive = {"MetadataDirective": "COPY"}
        else:
            directive = {"MetadataDirective": "REPLACE", "Metadata": meta.as_dict(),
                         "ContentType": content_type}
        size = int(head["ContentLength"])
        if size <= self.copy_limit:
            await self._s3("copy_object", f"copy {sfull} to {dfull}", Key=dfull,
                           CopySource=source, **directive, **self._storage())
            return
        metadata = head.get("Metadata", {}) if meta is None else meta.as_dict()
        resp = await self._s3("create_multipart_upload", f"copy {sfull} to {dfull}", Key=dfull,
                              Metadata=metadata, ContentType=content_type, **self._storage())
        upload_id = resp["UploadId"]
        self._active_uploads.add(upload_id)
        try:
            await self._copy_parts(sfull, dfull, head, upload_id, size)
        finally:
            self._active_uploads.discard(upload_id)

    async def _copy_parts(self, sfull: str, dfull: str, head: dict[str, Any], upload_id: str,
                          size: int) -> None:
        source = {"Bucket": self.bucket, "Key": sfull}
        part_size = max(self.copy_part_size, math.ceil(size / MAX_PARTS), MIN_PART)
        parts: dict[int, dict[str, str]] = {}
        limiter = trio.CapacityLimiter(self.part_uploaders)

        async def copy_part(number: int, first: int) -> None:
            last = min(first + part_size, size) - 1
            async with limiter:
                r = await self._s3("upload_part_copy", f"copy {sfull} part {number}",
                                   Key=dfull, UploadId=upload_id, PartNumber=number,
                                   CopySource=source, CopySourceRange=f"bytes={first}-{last}",
                                   CopySourceIfMatch=head["ETag"])
            parts[number] = {"ETag": r["CopyPartResult"]["ETag"]}

        try:
            try:
                async with trio.open_nursery() as nursery:
                    for number, first in enumerate(range(0, size, part_size), start=1):
                        nursery.start_soon(copy_part, number, first)
            except BaseExceptionGroup as eg:
                err = _single_error(eg)
                if err is None:
                    raise
                raise err from None
            await self._complete(dfull, upload_id, parts, f"copy {sfull} to {dfull}")
        except BaseException:
            await self._abort(dfull, upload_id, f"copy to {dfull}")
            raise

    @retry()
    async def list(self, prefix: str = "", cursor: str | None = None,
                   limit: int = 1000) -> ListPage:
        # Keys come URL-encoded and are decoded here with surrogate escapes: boto3's own
        # decoding turns bytes that are not UTF-8 (S3-compatible servers may store them) into
        # U+FFFD, i.e. into another key, which a HEAD or GET would then miss. Such a key
        # fails check_key (InvalidKey) when used: it is visibly that key's problem.
        kwargs: dict[str, Any] = {"Prefix": self.prefix + prefix, "MaxKeys": limit,
                                  "EncodingType": "url"}
        if cursor is not None:
            # a cursor that is not UTF-8 is listed again (the page after it repeats it)
            kwargs["StartAfter"] = (self.prefix + cursor).encode(
                "utf-8", "surrogateescape").decode("utf-8", "replace")
        resp = await self._s3("list_objects_v2", f"list {prefix!r}", **kwargs)
        page = ListPage()
        key = None
        for obj in resp.get("Contents", []):
            key = unquote(obj["Key"], errors="surrogateescape")[len(self.prefix):]
            if key.startswith(PROBE_PREFIX):
                continue
            page.entries.append(RemoteStat(
                key=key, size=int(obj["Size"]), etag=_etag(obj.get("ETag")),
                mtime_ns=int(obj["LastModified"].timestamp()) * 1_000_000_000))
        if resp.get("IsTruncated") and key is not None:
            page.cursor = key
        return page

    keeps_meta = True

    async def clean_temps(self, cutoff: float, dirs: Sequence[str] | None = None) -> int:
        """Abort incomplete multipart uploads under our prefix that this process is not
        running and that were started before ``cutoff`` (they cost storage until aborted)."""
        n = 0
        kwargs: dict[str, Any] = {"Prefix": self.prefix}
        while True:
            resp = await self._s3("list_multipart_uploads", "list incomplete uploads",
                                  **kwargs)
            for up in resp.get("Uploads", []):
                if up["UploadId"] in self._active_uploads:
                    continue
                if up["Initiated"].timestamp() >= cutoff:
                    continue
                await self._abort(up["Key"], up["UploadId"], f"cut upload of {up['Key']}")
                n += 1
            if not resp.get("IsTruncated"):
                return n
            kwargs["KeyMarker"] = resp.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker", "")

    @retry()
    async def stat(self, key: str) -> RemoteStat:
        head = await self._s3("head_object", f"stat {key}", Key=self._full(key))
        return self._stat_from_head(key, head)

    @staticmethod
    def _stat_from_head(key: str, head: dict[str, Any]) -> RemoteStat:
        size = int(head["ContentLength"])
        metadata = head.get("Metadata") or {}
        meta = (ObjectMeta.from_dict(metadata, size)
                if META_SIZE in metadata or META_HASH in metadata else None)
        modified = head.get("LastModified")
        return RemoteStat(key=key, size=size, etag=_etag(head.get("ETag")), meta=meta,
                          mtime_ns=int(modified.timestamp()) * 1_000_000_000
                          if modified else None)

    @retry()
    async def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """Copy the object onto itself with the new metadata (S3 metadata is immutable)."""
        full = self._full(key)
        head = await self._s3("head_object", f"update metadata of {key}", Key=full)
        await self._copy(full, full, head, meta)

    async def probe(self) -> None:
        key = self.prefix + PROBE_PREFIX + secrets.token_hex(8)
        payload = secrets.token_bytes(64)
        await self._s3("put_object", "probe write", Key=key, Body=payload)
        try:
            resp = await self._s3("get_object", "probe read", Key=key)
            back = await self._run("probe read", resp["Body"].read)
        except NotFound as exc:
            raise RemoteError(f"{self._where()}: probe object vanished: {exc}") from exc
        finally:
            with trio.CancelScope(shield=True):
                await self._s3("delete_object", "probe delete", Key=key)
        if back != payload:
            raise RemoteError(f"{self._where()}: probe object read back differently")

    def url(self, key: str) -> str | None:
        return quote_key(self.url_base, key)


def _fill(body: Any, buf: memoryview) -> int:
    """Fill ``buf`` from a StreamingBody; returns less only at its end.

    Reads through the http.client response under urllib3's when it is there: urllib3 2's
    readinto() reads into a new bytes object and copies that (a second copy of every byte,
    with the GIL held). The length is checked by the caller, which knows the object's size;
    a socket error becomes RemoteError like botocore's own."""
    raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    into = raw.readinto if raw is not None and hasattr(raw, "readinto") else body.readinto
    n = 0
    try:
        while n < len(buf):
            got = into(buf[n:])
            if not got:
                break
            n += got
    except OSError as exc:
        raise RemoteError(f"download broken after {n} bytes of a read: {exc}") from exc
    return n


def _read_small(path: str, limit: int) -> tuple[bytes, str] | None:
    """The whole file and its hash if it has at most ``limit`` bytes, else None."""
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            return None
        data = f.read(limit + 1)
    if len(data) > limit:
        return None
    return data, xxhash.xxh3_128_hexdigest(data)


def _read_part(fd: int, offset: int, size: int, hasher: Any) -> bytes:
    """Read up to ``size`` bytes at ``offset`` and feed them to the upload's hash, in order."""
    chunks = []
    got = 0
    while got < size:
        data = os.pread(fd, size - got, offset + got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    out = b"".join(chunks)
    hasher.update(out)
    return out
