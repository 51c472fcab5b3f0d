"""An FTP (or explicit FTPS) server as a mirror, through aioftp.

asyncio meets trio in this file only. Each FtpRemote owns one asyncio event loop running in a
daemon thread of its own (started on first use, stopped by ``aclose()``), and on that loop a
small pool of logged-in aioftp clients: one FTP connection carries one transfer at a time, so
``connections`` bounds both the transfers in flight and the sessions the server sees.

The trio side only submits coroutines (``asyncio.run_coroutine_threadsafe``) and waits on a trio
Event woken through the trio token, so no trio worker thread is parked on FTP. Only keys, paths,
bytes and plain values cross; errors are turned into domain errors on the asyncio side. State
that outlives one call (an open download) stays on the asyncio side in ``_transfers``, keyed by
an id the trio side chose, so a cancelled trio caller can still close it.

Methods named ``_a_*`` run on the asyncio loop; everything else runs in trio.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import errno
import itertools
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

import aioftp
import trio
import xxhash

from mirrorfs.config import mirror_defaults
from mirrorfs.errors import (
    InvalidKey,
    MirrorfsError,
    NotFound,
    PermanentRemoteError,
    RemoteError,
    RemoteUnavailable,
)
from mirrorfs.remotes.base import (
    MAX_FILE_SIZE,
    PROBE_PREFIX,
    TMP_PREFIX,
    ListPage,
    ObjectMeta,
    PutResult,
    ReadStream,
    Remote,
    RemoteStat,
    listing_order,
    quote_key,
    retry,
    split_key,
    stale_temp,
    subtree_may_match,
    tmp_name,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes per read() of a download and per block sent by put().
BLOCK_SIZE = 1024 * 1024
#: An idle connection older than this is checked with NOOP before reuse (servers drop them).
IDLE_CHECK_S = 15.0
#: How long to wait for the server to settle after we hang up a download early.
RESYNC_TIMEOUT_S = 10.0

#: OSErrors that mean the network, not the local disk, failed.
_NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
               errno.ETIMEDOUT, errno.EADDRNOTAVAIL, errno.ENETRESET}


def _size(text: object, what: str) -> int:
    """A size the server sent (SIZE reply, MLSD fact): untrusted; garbage is the mirror's
    error (RemoteError), not a ValueError escaping from deep inside a job or a read."""
    value = str(text).strip()
    if not (value.isascii() and value.isdigit()) or int(value[:20]) > MAX_FILE_SIZE:
        raise RemoteError(f"{what}: the server sent {value[:40]!r} as a size")
    return int(value)


def _mtime_ns(stamp: str | None) -> int | None:
    """Parse an FTP time value (MDTM, MLSD ``modify``: YYYYMMDDHHMMSS[.sss], UTC)."""
    if not stamp or len(stamp) < 14 or not stamp[:14].isdigit():
        return None
    try:  # the server's word: a month 13 is no time at all, not an error to raise
        t = time.strptime(stamp[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return calendar.timegm(t) * 1_000_000_000


def _code(exc: aioftp.StatusCodeError) -> str:
    codes = exc.received_codes
    return str(codes[-1] if isinstance(codes, tuple) and codes else codes)


def _is(exc: aioftp.StatusCodeError, *prefixes: str) -> bool:
    return _code(exc).startswith(prefixes)


def _in_step(exc: aioftp.StatusCodeError) -> bool:
    """Whether the connection can be reused after this error reply.

    A 4xx/5xx is the server refusing the command we sent. Any other unexpected code is most
    likely a reply to an earlier command read late: the connection is out of step, drop it.
    421 means the server is closing it anyway.
    """
    return _is(exc, "4", "5") and not _is(exc, "421")


def _hang_up(stream: aioftp.DataConnectionThrottleStreamIO) -> None:
    """Drop a data connection mid-transfer, at once.

    Not close(): on TLS that sends close_notify and waits for the server's, while the server
    is still blocked writing the rest of the file to us, so both sides sit until a timeout.
    """
    stream.writer.transport.abort()


@dataclass
class _Transfer:
    """A download in progress: the client is out of the pool until the transfer is closed."""

    client: _Client
    stream: aioftp.DataConnectionThrottleStreamIO | None  # None: nothing to read
    left: int | None


class _LocalFile:
    """The file being uploaded, read block by block in the loop's executor.

    If the upload is cancelled while a read is in flight, the descriptor is closed only when
    that read has finished, so the worker thread never reads a closed (or reused) descriptor.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None
        self._offset = 0
        self._pending: asyncio.Future[bytes] | None = None

    def _read_sync(self) -> bytes:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        data = os.pread(self._fd, BLOCK_SIZE, self._offset)
        self._offset += len(data)
        return data

    async def read(self) -> bytes:
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._read_sync)
        return await asyncio.shield(self._pending)

    def close(self) -> None:
        def close_now(_: object = None) -> None:
            fut = self._pending
            if fut is not None and fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: an abandoned read's error is not worth a log line
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

        if self._pending is not None and not self._pending.done():
            self._pending.add_done_callback(close_now)
        else:
            close_now()


class _Client(aioftp.Client):
    """aioftp's client, counting the replies read (to tell a dead pooled connection apart)."""

    replies = 0

    async def parse_line(self) -> tuple[aioftp.Code, str]:
        line = await super().parse_line()
        self.replies += 1
        return line


class _Pool:
    """Logged-in clients of one remote; lives on (and is only touched from) the asyncio loop."""

    def __init__(self, remote: FtpRemote) -> None:
        self._remote = remote
        self._idle: list[tuple[_Client, float]] = []
        self._sem = asyncio.Semaphore(remote.connections)
        self.closed = False

    async def acquire(self) -> tuple[_Client, bool]:
        """A logged-in client, and whether it was reused from the pool."""
        await self._sem.acquire()
        try:
            while self._idle:
                client, since = self._idle.pop()
                if time.monotonic() - since < IDLE_CHECK_S or await self._alive(client):
                    return client, True
                client.close()
            return await self._remote._a_connect(), False
        except BaseException:
            self._sem.release()
            raise

    def release(self, client: _Client, reusable: bool) -> None:
        if reusable and not self.closed:
            self._idle.append((client, time.monotonic()))
        else:
            client.close()
        self._sem.release()

    @staticmethod
    async def _alive(client: aioftp.Client) -> bool:
        try:
            await asyncio.wait_for(client.command("NOOP", "2xx"), 5)
            return True
        except (TimeoutError, aioftp.AIOFTPException, OSError):
            return False

    async def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for client, _ in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 2)
            client.close()


class _FtpReadStream(ReadStream):
    """The trio face of one download; the transfer itself lives on the asyncio side."""

    def __init__(self, remote: FtpRemote, parts: list[str], start: int,
                 length: int | None) -> None:
        self._remote = remote
        self._parts = parts
        self._start = start
        self._length = length
        self._tid = next(remote._tids)
        self._opened = False
        self._eof = length == 0
        self._error: BaseException | None = None

    async def __aenter__(self) -> ReadStream:
        await self._open()
        return self

    async def _open(self) -> None:
        if not self._opened and not self._eof:
            try:
                await self._remote._open_transfer(self._tid, self._parts, self._start,
                                                  self._length)
            except BaseException:
                # Cancelled just as the transfer was registered on the asyncio side: nobody
                # would close it (a failed __aenter__ gets no __aexit__), and it holds a
                # pooled connection.
                with trio.CancelScope(shield=True):
                    await self.aclose()
                raise
            self._opened = True

    async def read(self) -> bytes:
        if self._error is not None:
            # The transfer is gone; reading on must not look like a clean end of file.
            raise RemoteError(f"mirror {self._remote.name}: download failed earlier: "
                              f"{self._error}")
        await self._open()
        if self._eof:
            return b""
        r = self._remote
        try:
            tid = self._tid
            data = await r._call(lambda: r._guard("read", r._a_read(tid)))
        except BaseException as exc:
            self._error = exc
            raise
        if not data:
            self._eof = True
        return data

    async def aclose(self) -> None:
        self._eof = True
        loop = self._remote._loop
        if loop is not None:
            r = self._remote
            tid = self._tid
            await r._call(lambda: r._guard("close download", r._a_close_transfer(tid)), loop)


async def _outcome(make: Callable[[], Coroutine[Any, Any, T]]) -> tuple[bool, Any]:
    """Run ``make()`` and return its outcome instead of raising: if the trio side gave up on
    it (cancelled), asyncio must not log "Task exception was never retrieved". The coroutine
    is made here, on the loop: a task cancelled before its first step (aclose's time limit,
    a loop already stopping) then leaves no coroutine that was never awaited."""
    try:
        return True, await make()
    except BaseException as exc:
        return False, exc


class FtpRemote(Remote):
    """Mirror onto an FTP server: files under ``base_dir``, uploaded under a temp name first."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        options = {**mirror_defaults("ftp"), **options}
        self.name = name
        self.host: str = options["host"]
        self.port = int(options["port"])
        self.user: str = options["user"]
        self.password: str = options["password"]
        if not options["passive"]:
            raise PermanentRemoteError(
                f"mirror {name}: active FTP is not supported (aioftp speaks passive mode only)")
        self.tls = bool(options["tls"])
        self.verify_tls = bool(options["verify_tls"])
        self.ca_bundle: str | None = options.get("ca_bundle")
        base = options["base_dir"].strip("/")
        self.base_parts = base.split("/") if base else []
        self.connections = max(1, int(options["connections"]))
        self.timeout = float(options["timeout"])
        self.url_base: str | None = options.get("url_base")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: _Pool | None = None
        self._transfers: dict[int, _Transfer] = {}
        self._opening: dict[int, asyncio.Task[Any]] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        self._epsv = True  # until the server says it does not know EPSV
        self._tids = itertools.count()
        # Listing commands still to try, best first; fixed once one has worked. "LIST -a"
        # because vsftpd hides dot files from a plain LIST (unless force_dot_files=YES).
        self._list_cmds = ["MLSD", "LIST -a", "LIST"]
        self._list_known = False

    # -- the bridge (trio side) ------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._pool = _Pool(self)
            self._thread = threading.Thread(target=self._run_loop, args=(loop,),
                                            name=f"mirrorfs-ftp-{self.name}", daemon=True)
            self._thread.start()
            self._loop = loop
        return self._loop

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    async def _call(self, make: Callable[[], Coroutine[Any, Any, T]],
                    loop: asyncio.AbstractEventLoop | None = None) -> T:
        """Run ``make()`` on the FTP loop and wait for it without holding a trio thread.

        If the trio caller is cancelled the asyncio task is cancelled too; its own cleanup
        (closing a half-used connection) then runs on the loop without us waiting for it.
        """
        fut = asyncio.run_coroutine_threadsafe(_outcome(make), loop or self._ensure_loop())
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            fut.cancel()
            raise
        try:
            ok, value = fut.result()
        except asyncio.CancelledError:
            raise RemoteUnavailable(f"mirror {self.name}: closed while in use") from None
        if ok:
            return value  # type: ignore[no-any-return]
        if isinstance(value, asyncio.CancelledError):
            raise RemoteUnavailable(f"mirror {self.name}: closed while in use")
        raise value

    async def _op(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._call(lambda: self._guard(what, self._a_with_client(fn, *args)))

    # -- error translation and connections (asyncio side) ----------------------------------

    async def _guard(self, what: str, aw: Awaitable[T]) -> T:
        """Await ``aw``, turning aioftp and socket errors into domain errors.

        OSErrors that are not about the network (a local file that cannot be read) pass
        through unchanged: they are not the mirror's fault and retrying the mirror won't help.
        """
        where = f"mirror {self.name} (ftp://{self.host}:{self.port}): {what}"
        try:
            return await aw
        except MirrorfsError:
            raise
        except aioftp.StatusCodeError as exc:
            info = " ".join(s.strip() for s in exc.info) if isinstance(exc.info, list) \
                else str(exc.info)
            msg = f"{where}: server replied {_code(exc)} {info}"
            if _is(exc, "421"):
                raise RemoteUnavailable(msg) from None
            if _is(exc, "530"):
                raise PermanentRemoteError(msg + " (check user and password)") from None
            if _is(exc, "5"):
                raise PermanentRemoteError(msg) from None
            raise RemoteError(msg) from None
        except TimeoutError:
            raise RemoteUnavailable(f"{where}: timed out after {self.timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise PermanentRemoteError(f"{where}: TLS certificate rejected: "
                                       f"{exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise RemoteError(f"{where}: TLS error: {exc}") from None
        except (ConnectionError, EOFError, socket.gaierror) as exc:
            raise RemoteUnavailable(f"{where}: {exc or type(exc).__name__}") from None
        except OSError as exc:
            if exc.errno in _NET_ERRNOS:
                raise RemoteUnavailable(f"{where}: {exc.strerror}") from None
            raise

    async def _a_connect(self) -> _Client:
        client = _Client(socket_timeout=self.timeout, connection_timeout=self.timeout,
                               path_timeout=self.timeout, encoding="utf-8")
        try:
            await client.connect(self.host, self.port)
            if self.tls:
                await client.upgrade_to_tls(self._ssl_context())
            await client.login(self.user, self.password)
            await client.command("TYPE I", "200")
        except BaseException:
            client.close()
            raise
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        if not self.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _a_with_client(self, fn: Callable[..., Awaitable[T]], *args: Any,
                             hold: bool = False) -> T:
        """Run ``fn(client, *args)`` with a pooled client, keeping it only if still in step.

        A clean error reply leaves the control connection usable; anything else (a timeout, a
        cancellation mid-transfer) may leave replies in flight, so the connection is dropped.
        A pooled connection the server closed while it was idle (restart, idle timeout) fails
        before any reply; nothing reached the server then, so ``fn`` runs again on a new
        connection instead of reporting the mirror down. With ``hold`` a successful ``fn``
        keeps the client (it stored it somewhere that releases it later).
        """
        assert self._pool is not None
        pool = self._pool
        while True:
            client, reused = await pool.acquire()
            replies = client.replies
            release: bool | None = False  # True: back to the pool; None: fn keeps it
            try:
                result = await fn(client, *args)
                release = None if hold else True
                return result
            except (ConnectionError, EOFError) as exc:
                if reused and client.replies == replies:
                    log.debug("mirror %s: pooled connection was closed (%r); reconnecting",
                              self.name, exc)
                    continue
                raise
            except aioftp.StatusCodeError as exc:
                release = _in_step(exc)
                raise
            except MirrorfsError:
                release = True
                raise
            finally:
                if release is not None:
                    pool.release(client, release)

    async def _a_data(self, client: aioftp.Client, command: str,
                      offset: int = 0) -> aioftp.DataConnectionThrottleStreamIO:
        """Open a passive data connection for ``command``.

        Not aioftp's get_stream: that one leaks the connection when the command is refused,
        and with TLS it does the handshake before sending the command, while servers such as
        vsftpd start theirs only after it (both sides then wait for each other). Here TLS
        starts after the 1xx reply, reusing the control connection's session, as ftplib does.
        """
        reader, writer = await self._a_passive(client)
        try:
            if offset:
                await client.command(f"REST {offset}", "350")
            await client.command(command, "1xx")
            if self.tls:
                control = client.stream.writer.transport.get_extra_info("ssl_object")
                ctx = aioftp.SSLSessionBoundContext(ssl.PROTOCOL_TLS_CLIENT,
                                                    context=control.context,
                                                    session=control.session)
                await writer.start_tls(ctx, server_hostname=self.host,
                                       ssl_handshake_timeout=self.timeout)
        except BaseException:
            writer.close()
            raise
        return aioftp.DataConnectionThrottleStreamIO(
            client, reader, writer, throttles={"_": client.throttle},
            timeout=client.socket_timeout)

    async def _a_passive(
            self, client: aioftp.Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """EPSV (or PASV) and a plain TCP connection to the port the server gave.

        The address in a PASV reply is ignored, as aioftp does by default: behind NAT it is
        often wrong, and the control connection's host is right.
        """
        port = None
        if self._epsv:
            try:
                _, info = await client.command("EPSV", "229")
                port = client.parse_epsv_response(info[-1])[1]
            except aioftp.StatusCodeError as exc:
                if not _is(exc, "50"):
                    raise
                self._epsv = False
        if port is None:
            _, info = await client.command("PASV", "227")
            port = client.parse_pasv_response(info[-1])[1]
        return await asyncio.wait_for(asyncio.open_connection(self.host, port), self.timeout)

    # -- paths -----------------------------------------------------------------------------

    def _path(self, parts: list[str]) -> str:
        return "/" + "/".join(self.base_parts + parts)

    def _parts(self, key: str) -> list[str]:
        self.check_key(key)
        return split_key(key)

    async def _a_mkdirs(self, client: aioftp.Client, dir_parts: list[str]) -> None:
        """MKD every level (base included); failures are left for the next command to report."""
        full = self.base_parts + dir_parts
        for depth in range(1, len(full) + 1):
            with contextlib.suppress(aioftp.StatusCodeError):
                await client.command("MKD /" + "/".join(full[:depth]), "2xx")

    async def _a_prune(self, client: aioftp.Client, parts: list[str]) -> None:
        """Remove directories left empty above a removed file, up to the base (best effort)."""
        for depth in range(len(parts) - 1, 0, -1):
            try:
                await client.command("RMD " + self._path(parts[:depth]), "2xx")
            except aioftp.StatusCodeError:
                return

    # -- operations (asyncio side) ---------------------------------------------------------

    async def _a_store(self, client: _Client, dir_parts: list[str], name: str,
                       read: Callable[[], Awaitable[bytes]]) -> tuple[int, str]:
        """Upload what ``read()`` returns (until b"") to a temp name, then rename it in place.

        A failure with the connection still in step deletes the temp file at once; any other
        (timeout, cancellation) leaves that to a clean-up task on a fresh connection.
        """
        final = self._path([*dir_parts, name])
        tmp = self._path([*dir_parts, tmp_name()])
        replies = client.replies
        try:
            try:
                stream = await self._a_data(client, "STOR " + tmp)
            except aioftp.StatusCodeError as exc:
                if not _is(exc, "55"):
                    raise
                await self._a_mkdirs(client, dir_parts)
                stream = await self._a_data(client, "STOR " + tmp)
            h = xxhash.xxh3_128()
            size = 0
            try:
                while block := await read():
                    h.update(block)
                    size += len(block)
                    await stream.write(block)
            except BaseException:
                _hang_up(stream)
                raise
            await stream.finish()
            await self._a_rename_over(client, tmp, final, dir_parts)
        except BaseException as exc:
            if isinstance(exc, MirrorfsError) or (isinstance(exc, aioftp.StatusCodeError)
                                                  and _in_step(exc)):
                with contextlib.suppress(aioftp.StatusCodeError):
                    await client.command("DELE " + tmp, "2xx")
            elif client.replies > replies:  # the server heard us: the temp file may exist
                self._spawn_cleanup(tmp)
            raise
        return size, h.hexdigest()

    def _spawn_cleanup(self, path: str) -> None:
        task = asyncio.get_running_loop().create_task(self._a_cleanup(path))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _a_cleanup(self, path: str) -> None:
        async def dele(client: aioftp.Client) -> None:
            await client.command("DELE " + path, "2xx")

        try:
            await self._a_with_client(dele)
        except (aioftp.AIOFTPException, OSError, MirrorfsError) as exc:
            log.debug("mirror %s: temp file %s not removed: %r", self.name, path, exc)

    async def _a_rename_over(self, client: aioftp.Client, src: str, dst: str,
                             dst_dir_parts: list[str]) -> None:
        """RNFR/RNTO replacing ``dst``; on refusal create the directory, drop dst, try again."""
        try:
            await client.command("RNFR " + src, "350")
        except aioftp.StatusCodeError as exc:
            if _is(exc, "550"):
                raise NotFound(f"mirror {self.name}: {src}") from None
            raise
        try:
            await client.command("RNTO " + dst, "2xx")
            return
        except aioftp.StatusCodeError as exc:
            if not _is(exc, "55"):
                raise
        await self._a_mkdirs(client, dst_dir_parts)
        with contextlib.suppress(aioftp.StatusCodeError):
            await client.command("DELE " + dst, "2xx")
        await client.command("RNFR " + src, "350")
        await client.command("RNTO " + dst, "2xx")

    async def _a_put(self, client: _Client, parts: list[str],
                     local_path: str) -> PutResult:
        source = _LocalFile(local_path)
        try:
            size, digest = await self._a_store(client, parts[:-1], parts[-1], source.read)
        finally:
            source.close()
        return PutResult(size=size, xxhash=digest)

    async def _a_stat(self, client: aioftp.Client, parts: list[str], key: str) -> RemoteStat:
        path = self._path(parts)
        try:
            _, info = await client.command("SIZE " + path, "213")
            size = _size(info[-1], f"SIZE {key}")
        except aioftp.StatusCodeError as exc:
            if _is(exc, "550"):
                raise NotFound(f"mirror {self.name}: {key}") from None
            if not _is(exc, "50"):
                raise
            # SIZE not implemented: MLST (or a LIST of the parent), as aioftp does it.
            try:
                facts = await client.stat(path)
            except aioftp.StatusCodeError as exc2:
                if _is(exc2, "550"):
                    raise NotFound(f"mirror {self.name}: {key}") from None
                raise
            if facts.get("type") != "file":
                raise NotFound(f"mirror {self.name}: {key} is not a file") from None
            return RemoteStat(key=key, size=_size(facts.get("size", 0), f"MLST {key}"),
                              mtime_ns=_mtime_ns(facts.get("modify")))
        mtime_ns = None
        with contextlib.suppress(aioftp.StatusCodeError):
            _, info = await client.command("MDTM " + path, "213")
            mtime_ns = _mtime_ns(info[-1].strip())
        return RemoteStat(key=key, size=size, mtime_ns=mtime_ns)

    async def _a_delete(self, client: aioftp.Client, parts: list[str]) -> None:
        path = self._path(parts)
        try:
            await client.command("DELE " + path, "2xx")
        except aioftp.StatusCodeError as exc:
            if not _is(exc, "550"):
                raise
            # 550 is both "no such file" and "not allowed": only the first is fine.
            try:
                await client.command("SIZE " + path, "213")
            except aioftp.StatusCodeError:
                pass
            else:
                raise
        await self._a_prune(client, parts)

    async def _a_rename(self, client: aioftp.Client, sparts: list[str],
                        dparts: list[str]) -> None:
        await self._a_rename_over(client, self._path(sparts), self._path(dparts), dparts[:-1])
        await self._a_prune(client, sparts)

    async def _a_list_dir(self, client: aioftp.Client,
                          dir_parts: list[str]) -> list[tuple[str, bool, int, int | None]]:
        """(name, is_dir, size, mtime_ns) of one directory; a missing directory is empty."""
        path = self._path(dir_parts)
        cmd = self._list_cmds[0]
        parse = client.parse_mlsx_line if cmd == "MLSD" else client.parse_list_line
        try:
            stream = await self._a_data(client, f"{cmd} {path}")
        except aioftp.StatusCodeError as exc:
            unknown = ("500", "501", "502", "504") if cmd == "LIST -a" else ("500", "502", "504")
            if not self._list_known and len(self._list_cmds) > 1 and _is(exc, *unknown):
                log.debug("mirror %s: %s refused (%s), trying %s", self.name, cmd, _code(exc),
                          self._list_cmds[1])
                self._list_cmds.pop(0)
                return await self._a_list_dir(client, dir_parts)
            if _is(exc, "550", "450", "501"):  # pyftpdlib: "501 No such directory."
                return []
            raise
        self._list_known = True
        lines = []
        try:
            while line := await stream.readline():
                lines.append(line)
        except BaseException:
            _hang_up(stream)
            raise
        await stream.finish()
        out = []
        for line in lines:
            try:
                name_path, facts = parse(line)
                size = _size(facts.get("size", 0) or 0, "listing")
            except (ValueError, KeyError, IndexError, RemoteError):
                log.debug("mirror %s: unparsed listing line %r", self.name, line)
                continue
            name = PurePosixPath(name_path).name
            kind = facts.get("type")
            if name in ("", ".", "..") or kind not in ("file", "dir"):
                continue
            out.append((name, kind == "dir", size, _mtime_ns(facts.get("modify"))))
        return out

    async def _a_list(self, client: aioftp.Client, prefix: str, cursor: str | None,
                      limit: int) -> ListPage:
        page = ListPage()
        start = prefix.rpartition("/")[0]
        try:
            start_parts = split_key(start) if start else []
        except InvalidKey:
            return page

        async def walk(dir_parts: list[str], dir_key: str) -> bool:
            entries = await self._a_list_dir(client, dir_parts)
            entries.sort(key=lambda e: listing_order(e[0], e[1]))
            for name, is_dir, size, mtime_ns in entries:
                key = dir_key + listing_order(name, is_dir)
                if name.startswith(TMP_PREFIX) or (not dir_key and name.startswith(PROBE_PREFIX)):
                    continue
                if is_dir:
                    if subtree_may_match(key, prefix, cursor) and \
                            await walk([*dir_parts, name], key):
                        return True
                elif key.startswith(prefix) and (cursor is None or key > cursor):
                    page.entries.append(RemoteStat(key=key, size=size, mtime_ns=mtime_ns))
                    if len(page.entries) >= limit:
                        page.cursor = key
                        return True
            return False

        await walk(start_parts, start + "/" if start else "")
        return page

    async def _a_clean_temps(self, client: aioftp.Client, cutoff: float,
                             dirs: Sequence[str] | None) -> int:
        n = 0

        async def walk(dir_parts: list[str], deep: bool) -> None:
            nonlocal n
            for name, is_dir, _size, mtime_ns in await self._a_list_dir(client, dir_parts):
                if is_dir:
                    if deep:
                        await walk([*dir_parts, name], deep)
                elif stale_temp(name, None if mtime_ns is None else mtime_ns / 1e9, cutoff):
                    with contextlib.suppress(aioftp.StatusCodeError):
                        await client.command("DELE " + self._path([*dir_parts, name]), "2xx")
                        n += 1

        if dirs is None:
            await walk([], True)
        for d in dirs or []:
            try:
                parts = split_key(d) if d else []
            except InvalidKey:
                continue
            await walk(parts, False)
        return n

    async def _a_probe(self, client: _Client) -> None:
        payload = secrets.token_bytes(64)
        name = PROBE_PREFIX + secrets.token_hex(8)
        blocks = [b"", payload]

        async def read() -> bytes:
            return blocks.pop()

        await self._a_store(client, [], name, read)
        stream = await self._a_data(client, "RETR " + self._path([name]))
        back = b""
        try:
            while data := await stream.read(BLOCK_SIZE):
                back += data
        except BaseException:
            _hang_up(stream)
            raise
        await stream.finish()
        await client.command("DELE " + self._path([name]), "2xx")
        if back != payload:
            raise RemoteError(f"mirror {self.name}: probe file read back differently")

    # -- downloads (asyncio side) ----------------------------------------------------------

    async def _a_open_transfer(self, tid: int, parts: list[str], start: int,
                               length: int | None) -> None:
        # Python 3.11's wait_for (inside aioftp) can swallow a cancellation that lands as a
        # reply arrives, so a "cancelled" open may still register its transfer: the close
        # waits for this task, whatever became of it.
        task = asyncio.current_task()
        assert task is not None and self._pool is not None
        self._opening[tid] = task
        try:
            await self._a_open_transfer_now(tid, parts, start, length)
        finally:
            del self._opening[tid]

    async def _a_open_transfer_now(self, tid: int, parts: list[str], start: int,
                                   length: int | None) -> None:
        await self._a_with_client(self._a_start_download, tid, parts, start, length, hold=True)

    async def _a_start_download(self, client: _Client, tid: int, parts: list[str],
                                start: int, length: int | None) -> None:
        """RETR from ``start``; the transfer (and the client with it) is kept under ``tid``."""
        stream: aioftp.DataConnectionThrottleStreamIO | None
        try:
            stream = await self._a_data(client, "RETR " + self._path(parts), start)
        except aioftp.StatusCodeError as exc:
            if _is(exc, "550"):
                raise NotFound(f"mirror {self.name}: {'/'.join(parts)}") from None
            if not (start and _is(exc, "554")):
                raise
            stream = None  # REST past the end of the file: nothing to read, as at EOF
        self._transfers[tid] = _Transfer(client, stream, length)

    async def _a_read(self, tid: int) -> bytes:
        t = self._transfers.get(tid)
        if t is None:
            return b""
        if t.stream is None:
            self._drop_transfer(tid, reusable=True)
            return b""
        want = BLOCK_SIZE if t.left is None else min(BLOCK_SIZE, t.left)
        chunks: list[bytes] = []
        got = 0
        try:
            while got < want:
                data = await t.stream.read(want - got)
                if not data:
                    break
                chunks.append(data)
                got += len(data)
        except BaseException:
            self._drop_transfer(tid, reusable=False)
            raise
        if t.left is not None:
            t.left -= got
        if got < want:
            # The end of the file: the final reply says whether the server sent all of it.
            self._transfers.pop(tid)
            try:
                await t.stream.finish()
            except aioftp.StatusCodeError as exc:
                self._pool_release(t.client, _in_step(exc))
                raise
            except BaseException:
                self._pool_release(t.client, False)
                raise
            self._pool_release(t.client, True)
        elif t.left == 0:
            await self._a_close_transfer(tid)
        return b"".join(chunks)

    async def _a_close_transfer(self, tid: int) -> None:
        """Hang up a download early and bring the control connection back in step.

        The server answers the dropped data connection with 426 (or 226 if it had sent
        everything already). That reply is awaited first: servers that read commands during a
        transfer (pyftpdlib) may answer a NOOP before it. A NOOP, read up to its 200, then
        skips anything more (426 followed by 226, as some servers do).
        """
        opening = self._opening.get(tid)
        if opening is not None:
            await asyncio.wait([opening])
        t = self._transfers.pop(tid, None)
        if t is None:
            return
        if t.stream is None:
            self._pool_release(t.client, True)
            return
        _hang_up(t.stream)
        try:
            await asyncio.wait_for(self._a_resync(t.client), min(self.timeout, RESYNC_TIMEOUT_S))
        except (TimeoutError, aioftp.AIOFTPException, OSError) as exc:
            log.debug("mirror %s: dropping connection after an early hang-up: %r", self.name, exc)
            self._pool_release(t.client, False)
            return
        except BaseException:
            self._pool_release(t.client, False)
            raise
        self._pool_release(t.client, True)

    @staticmethod
    async def _a_resync(client: aioftp.Client) -> None:
        code, _ = await client.parse_response()
        while code.startswith("1"):
            code, _ = await client.parse_response()
        await client.command("NOOP")
        code, _ = await client.parse_response()
        while code != "200":
            code, _ = await client.parse_response()

    def _drop_transfer(self, tid: int, reusable: bool) -> None:
        t = self._transfers.pop(tid, None)
        if t is not None:
            if t.stream is not None:
                _hang_up(t.stream)
            self._pool_release(t.client, reusable)

    def _pool_release(self, client: _Client, reusable: bool) -> None:
        assert self._pool is not None
        self._pool.release(client, reusable)

    async def _a_shutdown(self) -> None:
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=5)
        for tid in list(self._transfers):
            self._drop_transfer(tid, reusable=False)
        if self._pool is not None:
            await self._pool.close()

    # -- the Remote interface (trio side) --------------------------------------------------

    def check_key(self, key: str) -> None:
        for ch, label in (("\r", "CR"), ("\n", "LF"), ("\0", "NUL")):
            if ch in key:
                raise InvalidKey(f"FTP cannot store {key!r}: it contains {label}, which would "
                                 "end the FTP command early (command injection)")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidKey(f"FTP cannot store {key!r}: the name is not valid UTF-8, the "
                             "connection's encoding") from None
        for part in split_key(key):
            if part != part.strip(" \t"):
                raise InvalidKey(f"FTP cannot store {key!r}: a name starting or ending with "
                                 "white space does not survive FTP listings")

    @retry()
    async def put(self, key: str, local_path: str, meta: ObjectMeta) -> PutResult:
        """Upload under a temp name and rename; FTP keeps no metadata, so ``meta`` is unused."""
        parts = self._parts(key)
        return await self._op(f"put {key}", self._a_put, parts, local_path)

    def open_read(self, key: str, start: int = 0, length: int | None = None) -> ReadStream:
        return _FtpReadStream(self, self._parts(key), start, length)

    @retry()
    async def _open_transfer(self, tid: int, parts: list[str], start: int,
                             length: int | None) -> None:
        await self._call(lambda: self._guard(f"read {'/'.join(parts)}",
                                             self._a_open_transfer(tid, parts, start, length)))

    @retry()
    async def delete(self, key: str) -> None:
        await self._op(f"delete {key}", self._a_delete, self._parts(key))

    @retry()
    async def rename(self, src: str, dst: str, size: int | None = None) -> None:
        sparts, dparts = self._parts(src), self._parts(dst)
        if sparts != dparts:
            await self._op(f"rename {src} -> {dst}", self._a_rename, sparts, dparts)

    @retry()
    async def list(self, prefix: str = "", cursor: str | None = None,
                   limit: int = 1000) -> ListPage:
        return await self._op(f"list {prefix!r}", self._a_list, prefix, cursor, limit)

    @retry()
    async def stat(self, key: str) -> RemoteStat:
        return await self._op(f"stat {key}", self._a_stat, self._parts(key), key)

    async def clean_temps(self, cutoff: float, dirs: Sequence[str] | None = None) -> int:
        return await self._op("remove stale temp files", self._a_clean_temps, cutoff, dirs)

    async def probe(self) -> None:
        await self._op("probe", self._a_probe)

    async def aclose(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            try:
                await self._call(self._a_shutdown, loop)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                await trio.to_thread.run_sync(thread.join, 10)
        self._pool = None

    def url(self, key: str) -> str | None:
        return quote_key(self.url_base, key)
