"""The control socket: admin commands on a live mount.

Owns ``<cache_dir>/control.sock`` (mode 0600, so only root or the mounting user can talk to
it). The protocol is one JSON object per line each way: ``{"cmd": "stats", ...}`` answered by
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Long commands (drain,
move, backfill) stream ``{"progress": {...}}`` lines before the final answer. Each command is
a coroutine in :mod:`mirrorfs.admin` that gets the daemon; nothing here knows what they do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from mirrorfs.daemon import Daemon

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20

Progress = Callable[[dict[str, Any]], Awaitable[None]]
Command = Callable[["Daemon", dict[str, Any], Progress], Awaitable[Any]]


def socket_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, SOCKET_NAME)


async def serve_control(daemon: Daemon, commands: dict[str, Command],
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    path = socket_path(daemon.cfg.cache_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        async def handle(stream: trio.SocketStream) -> None:
            await _handle(daemon, commands, stream)

        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _lines(stream: trio.SocketStream) -> AsyncIterator[bytes]:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        if len(buf) > MAX_REQUEST:
            return
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line


async def _handle(daemon: Daemon, commands: dict[str, Command],
                  stream: trio.SocketStream) -> None:
    async def send(obj: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(obj, default=str).encode() + b"\n")

    peer_uid = _peer_uid(stream)
    try:
        async for line in _lines(stream):
            try:
                req = json.loads(line)
                name = req.get("cmd")
                fn = commands[name]
            except (ValueError, KeyError, AttributeError):
                await send({"ok": False, "error": f"unknown request {line[:100]!r}"})
                continue
            req.pop("peer_uid", None)  # only the kernel says who is asking
            if peer_uid is not None:
                req["peer_uid"] = peer_uid
            try:
                result = await fn(daemon, req, lambda p: send({"progress": p}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.info("control command %s stopped: the client went away", name)
                return
            except (LookupError, ValueError) as exc:  # a name or an argument that is wrong
                await send({"ok": False, "error": str(exc), "usage": True})
            except OSError as exc:
                await send({"ok": False, "error": str(exc)})
            except Exception as exc:
                log.exception("control command %s failed", name)
                await send({"ok": False, "error": f"internal error: {exc}"})
            else:
                await send({"ok": True, "result": result})
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


def _peer_uid(stream: trio.SocketStream) -> int | None:
    """Who is on the other end (SO_PEERCRED: pid, uid, gid), for ``pause``'s record."""
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])


class CommandError(RuntimeError):
    """A command the daemon refused; ``usage`` when the request itself was wrong (a mirror
    or path that does not exist, a bad argument): exit status 2, not 1."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class ControlClient:
    """Blocking client used by the CLI (no trio needed)."""

    def __init__(self, cache_dir: str, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path(cache_dir))
        self.file = self.sock.makefile("rb")

    def call(self, cmd: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
             **args: Any) -> Any:
        self.sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the daemon closed the control connection")
            msg = json.loads(line)
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(msg["progress"])
                continue
            if not msg.get("ok"):
                raise CommandError(msg.get("error", "failed"), bool(msg.get("usage")))
            return msg.get("result")

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.file.close()
        self.sock.close()
