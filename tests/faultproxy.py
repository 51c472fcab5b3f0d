"""A small TCP proxy on 127.0.0.1 that injects network faults between mirrorfs and a server.

Put it in front of a loopback server (moto, the FTP control connection) and point the mirror's
config at :attr:`FaultProxy.port`. One thread accepts; each connection has one pump thread
that owns both of its sockets, so a fault requested from the test thread (a flag) is carried
out by the thread that owns the sockets -- no socket is ever closed under another thread.

Faults:

- ``delay``: every chunk forwarded waits this many seconds first (a slow link);
- ``stall()``: stop forwarding in both directions, connections stay open (a hung server);
- ``cut(direction, after, times)``: the next ``times`` connections are reset (RST) once
  ``after`` bytes went in ``direction`` ("up": client to server, "down": server to client),
  i.e. mid-transfer; ``cut_all()`` resets every live connection now;
- ``refuse()``: reset every live connection and close the listening socket, so new
  connections get ECONNREFUSED (a server that went away);
- ``clear()``: back to normal forwarding (and listening again on the same port).

:attr:`FaultProxy.faults` counts the faults carried out, for the reliability report.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
CHUNK = 64 * 1024
TICK = 0.02


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (what a crashed peer or a middlebox does)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class _Conn:
    client: socket.socket
    server: socket.socket
    sent: Counter[str] = field(default_factory=Counter)  # "up"/"down" -> bytes forwarded
    cut_now: bool = False
    closed: bool = False
    graceful: bool = False


@dataclass
class _CutRule:
    direction: str
    after: int
    times: int  # connections still to cut; < 0: every one


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = HOST, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.delay = 0.0
        self.stalled = False
        self.refusing = False
        self.faults: Counter[str] = Counter()
        self.connections = 0
        #: chunks forwarded after waiting ``delay`` (what a test can check instead of a time)
        self.delayed = 0
        self._cut: _CutRule | None = None
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Self:
        self._stop.clear()
        self._listen()
        return self

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.port))
        s.listen(64)
        s.settimeout(TICK * 5)
        self.port = s.getsockname()[1]
        self._listener = s
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(s,),
                                               name=f"faultproxy-{self.port}", daemon=True)
        self._accept_thread.start()

    def _unlisten(self) -> None:
        s, self._listener = self._listener, None
        t, self._accept_thread = self._accept_thread, None
        if s is not None:
            s.close()
        if t is not None:
            t.join(5)

    def stop(self) -> None:
        self._stop.set()
        self._unlisten()
        self.cut_all(count=False)
        deadline = time.monotonic() + 5
        while self.live() and time.monotonic() < deadline:
            time.sleep(TICK)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def stall(self) -> None:
        self.stalled = True
        self.faults["stall"] += 1

    def cut(self, direction: str = "up", after: int = 0, times: int = 1) -> None:
        assert direction in ("up", "down")
        with self._lock:
            self._cut = _CutRule(direction, after, times)

    def cut_all(self, count: bool = True) -> int:
        with self._lock:
            live = [c for c in self._conns if not c.closed]
            for c in live:
                c.cut_now = True
        if count:
            self.faults["cut"] += len(live)
        return len(live)

    def refuse(self) -> None:
        """The server is gone: new connections are refused, live ones are reset."""
        if not self.refusing:
            self.refusing = True
            self.faults["refuse"] += 1
            self._unlisten()
            self.cut_all(count=False)

    def clear(self) -> None:
        """Normal forwarding again; connections that were stalled carry on."""
        self.stalled = False
        self.delay = 0.0
        with self._lock:
            self._cut = None
        if self.refusing:
            self.refusing = False
            self._listen()

    def live(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if not c.closed)

    # ------------------------------------------------------------------ plumbing

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set() and self._listener is listener:
            try:
                client, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setblocking(False)
            conn = _Conn(client, server)
            with self._lock:
                self._conns = [c for c in self._conns if not c.closed] + [conn]
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn,), daemon=True,
                             name=f"faultproxy-{self.port}-conn").start()

    def _should_cut(self, conn: _Conn, direction: str) -> bool:
        with self._lock:
            rule = self._cut
            if rule is None or rule.direction != direction or conn.sent[direction] < rule.after:
                return False
            if rule.times > 0:
                rule.times -= 1
                if rule.times == 0:
                    self._cut = None
            self.faults["cut"] += 1
            return True

    def _budget(self, conn: _Conn, direction: str) -> int | None:
        """Bytes that may still go in ``direction`` before a pending cut rule fires."""
        with self._lock:
            rule = self._cut
            if rule is None or rule.direction != direction:
                return None
            return max(0, rule.after - conn.sent[direction])

    def _pump(self, conn: _Conn) -> None:
        pairs = {conn.client: (conn.server, "up"), conn.server: (conn.client, "down")}
        try:
            while not conn.cut_now and not self._stop.is_set():
                if self.stalled:
                    time.sleep(TICK)
                    continue
                readable, _w, _x = select.select(list(pairs), [], [], TICK)
                for src in readable:
                    dst, direction = pairs[src]
                    budget = self._budget(conn, direction)
                    want = CHUNK if budget is None else max(1, min(CHUNK, budget))
                    try:
                        data = src.recv(want)
                    except BlockingIOError:
                        continue
                    if not data:
                        # One side closed: close both, gracefully (an RST would throw away
                        # what is still in the other socket's send buffer).
                        conn.graceful = True
                        return
                    if self.delay:
                        time.sleep(self.delay)
                        with self._lock:
                            self.delayed += 1
                    if not self._send(conn, dst, data):
                        return
                    conn.sent[direction] += len(data)
                    if self._should_cut(conn, direction):
                        conn.cut_now = True
                        break
        except OSError:
            pass
        finally:
            conn.closed = True
            for s in (conn.client, conn.server):
                if conn.graceful:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_WR)
                    s.close()
                else:
                    _reset(s)

    def _send(self, conn: _Conn, sock: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if conn.cut_now or self._stop.is_set():
                return False
            _r, writable, _x = select.select([], [sock], [], TICK)
            if not writable or self.stalled:
                continue
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                continue
        return True
