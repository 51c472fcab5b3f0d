"""Real servers on 127.0.0.1 for the remote tests: moto (S3), pyftpdlib and vsftpd (FTP).

Each server is an object with ``start()``, ``stop()`` and ``restart()`` and is a context manager;
the port chosen at the first start is kept, so a test can take a mirror away and bring it back
("stop the FTP server, write files, start it again"). ``options()`` returns the config section a
mirror of that server needs. Nothing here imports mirrorfs, so fixtures anywhere can use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
VSFTPD = "/usr/sbin/vsftpd"
FTP_PERMS = "elradfmwMT"


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers that cannot take port 0)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s") from None
            time.sleep(0.02)


class _Server:
    """start/stop/restart and the context-manager protocol shared by the servers below."""

    port: int = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def bucket_objects(s3: Any, bucket: str | None = None) -> dict[str, bytes]:
    """Every object of a bucket (``s3.bucket`` by default) with its bytes, but the mirror's
    own objects (``.mirrorfs-`` probes and temporaries), which come and go on their own."""
    c = s3.client()
    bucket = bucket or s3.bucket
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            if not o["Key"].startswith(".mirrorfs-"):
                out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _let_moto_route_newlines() -> None:
    """S3 keys may hold LF; moto's URL rule for keys (``(?P<key_name>.+)``) stops at one,
    so every request on such a key got 404 (PUT included). Make the rule's ``.+`` match
    newlines too, where moto turns its URL patterns into Flask routes. This fixes the
    server's routing and fakes nothing: requests still go over HTTP, moto stores and
    serves the object."""
    import moto.core.base_backend as base

    convert = base.convert_regex_to_flask_path
    if getattr(convert, "_mirrorfs_newlines", False):
        return

    def newline_safe(url_path: str) -> str:
        return convert(url_path).replace('<regex(".+"):key_name>',
                                         '<regex("[\\s\\S]+"):key_name>')

    newline_safe._mirrorfs_newlines = True  # type: ignore[attr-defined]
    base.convert_regex_to_flask_path = newline_safe  # type: ignore[assignment]


def _let_moto_keep_key_bytes() -> None:
    """moto decodes the percent-escapes of a key with errors="replace": a key sent with a
    byte that is not UTF-8 (``%FF``) was stored as U+FFFD, another key. S3-compatible servers
    that store the bytes as sent exist; make moto one of them (surrogate escapes inside,
    ``%FF`` again in URL-encoded listings), so that tests can put such a key in a bucket.
    Keys that are UTF-8 are handled exactly as before."""
    from urllib.parse import quote, unquote

    import moto.s3.models as models
    import moto.s3.responses as responses

    if getattr(responses.S3Response.get_safe_path, "_mirrorfs_bytes", False):
        return

    def get_safe_path(self: Any) -> str:
        return unquote(self.raw_path, errors="surrogateescape")

    def safe_name(self: Any, encoding_type: str | None = None) -> str:
        if encoding_type == "url":
            return quote(self.name, errors="surrogateescape")
        return str(self.name)

    get_safe_path._mirrorfs_bytes = True  # type: ignore[attr-defined]
    responses.S3Response.get_safe_path = get_safe_path  # type: ignore[method-assign]
    models.FakeKey.safe_name = safe_name  # type: ignore[method-assign]


class MotoS3(_Server):
    """moto in server mode, with one bucket created at the first start.

    moto keeps its state in process-global backends, so the bucket and its objects survive a
    restart (unlike a real outage, nothing is lost).
    """

    def __init__(self, bucket: str = "mirror", region: str = "us-east-1") -> None:
        self.bucket = bucket
        self.region = region
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        _let_moto_route_newlines()
        _let_moto_keep_key_bytes()
        self._server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.create_bucket(self.bucket)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        """A plain boto3 client on this server, for checking what a mirror really wrote."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def start_recording(self) -> None:
        """moto's request recorder (its documented /moto-api/recorder endpoints)."""
        import urllib.request

        for what in ("reset-recording", "start-recording"):
            urllib.request.urlopen(urllib.request.Request(
                f"{self.endpoint_url}/moto-api/recorder/{what}", method="POST")).read()

    def stop_recording(self) -> None:
        """Stop moto's recorder and empty its file: left on, it writes every later request
        body (base64, in JSON) to disk for the rest of the session."""
        import urllib.request

        for what in ("stop-recording", "reset-recording"):
            urllib.request.urlopen(urllib.request.Request(
                f"{self.endpoint_url}/moto-api/recorder/{what}", method="POST")).read()

    def recorded_requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path, headers) of every request since start_recording()."""
        import json
        import urllib.parse
        import urllib.request

        text = urllib.request.urlopen(
            f"{self.endpoint_url}/moto-api/recorder/download-recording").read().decode()
        out = []
        for line in text.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line moto is still writing
            out.append((e["method"], urllib.parse.urlparse(e["url"]).path,
                        dict(e.get("headers") or {})))
        return out

    def recorded(self) -> list[tuple[str, str]]:
        """(method, path) of every request since start_recording()."""
        return [(method, path) for method, path, _h in self.recorded_requests()]

    def create_bucket(self, bucket: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)

    def options(self, **extra: Any) -> dict[str, Any]:
        """A mirror config section for this server (sizes in bytes, as the config gives them)."""
        opts: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "bucket": self.bucket,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "addressing_style": "path",
        }
        opts.update(extra)
        return opts


class PyFtpd(_Server):
    """pyftpdlib in a thread of this process, one user whose home is ``root``."""

    def __init__(self, root: str | os.PathLike[str], user: str = "mirror",
                 password: str = "secret", read_limit: int = 0, write_limit: int = 0) -> None:
        self.root = Path(root)
        self.user = user
        self.password = password
        #: bytes per second the server receives per upload (0: as fast as it can), for tests
        #: that need an upload in flight for a while
        self.read_limit = read_limit
        #: bytes per second the server sends per download (0: as fast as it can), for tests
        #: that need a download in flight for a while
        self.write_limit = write_limit
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: every command line the server received, for tests that count or inspect them
        self.commands: list[str] = []

    def start(self) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
        from pyftpdlib.ioloop import IOLoop
        from pyftpdlib.servers import FTPServer

        # A handler of our own stops pyftpdlib from installing its stderr logging; its INFO
        # lines (one per command) would drown the test output.
        ftplog = logging.getLogger("pyftpdlib")
        if not ftplog.handlers:
            ftplog.addHandler(logging.NullHandler())
        ftplog.setLevel(logging.WARNING)
        self.root.mkdir(parents=True, exist_ok=True)
        authorizer = DummyAuthorizer()
        authorizer.add_user(self.user, self.password, str(self.root), perm=FTP_PERMS)
        commands = self.commands

        def pre_process_command(h: Any, line: str, cmd: str, arg: str) -> None:
            commands.append(line)
            FTPHandler.pre_process_command(h, line, cmd, arg)

        # auth_failed_timeout: no 3 s pause after a failed login (tests try wrong passwords)
        handler: Any = type("Handler", (FTPHandler,),
                            {"authorizer": authorizer, "pre_process_command": pre_process_command,
                             "auth_failed_timeout": 0})
        if self.read_limit or self.write_limit:
            handler.dtp_handler = type("Dtp", (ThrottledDTPHandler,),
                                       {"read_limit": self.read_limit,
                                        "write_limit": self.write_limit})
        # A private IOLoop: the default is a process-wide singleton that close_all() would
        # close under any other pyftpdlib server of this process.
        self._server = FTPServer((HOST, self.port), handler, ioloop=IOLoop())
        self.port = self._server.socket.getsockname()[1]
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(self._server,),
                                        name=f"pyftpd-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self, server: Any) -> None:
        try:
            while not self._stop.is_set():
                server.ioloop.loop(0.05, blocking=False)
        finally:
            server.close_all()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
            self._thread = None
            self._server = None

    def options(self, **extra: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {"host": HOST, "port": self.port, "user": self.user,
                                "password": self.password, "base_dir": "/", "timeout": 10}
        opts.update(extra)
        return opts


class Vsftpd(_Server):
    """Debian's vsftpd as a subprocess: anonymous users may upload, rename and delete in /pub.

    Anonymous mode needs no system account or PAM; vsftpd chroots into ``workdir/root`` (which
    must not be writable by the FTP user) and the writable mirror base is ``/pub`` inside it,
    which is ``self.root`` on disk. Needs root, like any vsftpd that chroots.

    With ``tls=True`` it demands explicit FTPS (AUTH TLS, protected data connections, TLS
    session reuse) with a self-signed certificate for 127.0.0.1 made by the openssl tool;
    ``self.cafile`` is that certificate, to pass as ``ca_bundle``.
    """

    def __init__(self, workdir: str | os.PathLike[str], ftp_user: str = "ftp",
                 tls: bool = False) -> None:
        self.workdir = Path(workdir)
        self.ftp_user = ftp_user
        self.tls = tls
        self.cafile = self.workdir / "cert.pem"
        self.chroot = self.workdir / "root"
        self.root = self.chroot / "pub"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available(tls: bool = False) -> bool:
        return (os.path.exists(VSFTPD) and os.geteuid() == 0
                and (not tls or shutil.which("openssl") is not None))

    def _make_cert(self) -> list[str]:
        key = self.workdir / "key.pem"
        if not self.cafile.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", str(key), "-out", str(self.cafile), "-days", "2",
                            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
                           check=True, capture_output=True)
        return ["ssl_enable=YES", "allow_anon_ssl=YES", "force_anon_logins_ssl=YES",
                "force_anon_data_ssl=YES", "require_ssl_reuse=YES",
                f"rsa_cert_file={self.cafile}", f"rsa_private_key_file={key}"]

    def _write_config(self) -> Path:
        empty = self.workdir / "empty"
        for d in (self.chroot, self.root, empty):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.chroot, 0o755)
        os.chmod(empty, 0o755)
        shutil.chown(self.root, user=self.ftp_user, group=None)
        os.chmod(self.root, 0o755)
        conf = self.workdir / "vsftpd.conf"
        conf.write_text("\n".join([
            "listen=YES",
            "listen_ipv6=NO",
            f"listen_address={HOST}",
            f"listen_port={self.port}",
            "background=NO",
            "anonymous_enable=YES",
            "local_enable=NO",
            f"ftp_username={self.ftp_user}",
            "no_anon_password=YES",
            f"anon_root={self.chroot}",
            "write_enable=YES",
            "anon_upload_enable=YES",
            "anon_mkdir_write_enable=YES",
            "anon_other_write_enable=YES",
            "anon_umask=022",
            "pasv_enable=YES",
            f"pasv_address={HOST}",
            "connect_from_port_20=NO",
            f"secure_chroot_dir={empty}",
            "nopriv_user=nobody",
            "seccomp_sandbox=NO",
            "isolate=NO",
            "isolate_network=NO",
            "xferlog_enable=NO",
            "dirmessage_enable=NO",
            "use_localtime=NO",
            "max_per_ip=0",
            "idle_session_timeout=600",
            f"vsftpd_log_file={self.workdir / 'vsftpd.log'}",
            *(self._make_cert() if self.tls else []),
            "",
        ]))
        return conf

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        conf = self._write_config()
        self._proc = subprocess.Popen([VSFTPD, str(conf)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            out = self._kill()
            raise RuntimeError(f"vsftpd did not start: {out!r}") from None

    def _kill(self) -> bytes:
        if self._proc is None:
            return b""
        proc, self._proc = self._proc, None
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return out or b""

    def stop(self) -> None:
        self._kill()
        # vsftpd forks a process per session; the sessions die with their client connections.

    def options(self, **extra: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {"host": HOST, "port": self.port, "user": "anonymous",
                                "password": "mirrorfs@", "base_dir": "/pub", "timeout": 10}
        if self.tls:
            opts.update(tls=True, ca_bundle=str(self.cafile))
        opts.update(extra)
        return opts


@contextlib.contextmanager
def moto_s3(bucket: str = "mirror") -> Iterator[MotoS3]:
    with MotoS3(bucket) as server:
        yield server


@contextlib.contextmanager
def pyftpd(root: str | os.PathLike[str] | None = None) -> Iterator[PyFtpd]:
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="pyftpd-"))
        server = PyFtpd(root)
        stack.enter_context(server)
        yield server


@contextlib.contextmanager
def vsftpd(workdir: str | os.PathLike[str] | None = None, tls: bool = False) -> Iterator[Vsftpd]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vsftpd-"))
        server = Vsftpd(workdir, tls=tls)
        stack.enter_context(server)
        yield server


class SilentServer:
    """A port that accepts TCP connections and never says a word (to test client timeouts).
    ``connections`` counts those accepted: a client that retried would make more than one."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)  # open, silent

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()
