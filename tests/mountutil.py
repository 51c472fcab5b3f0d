"""A real mirrorfs mount in a subprocess, for tests and benchmarks.

The daemon never runs in the process that uses the mount (a process accessing its own FUSE
mount can deadlock). Teardown always lazy-unmounts and kills a stuck daemon. The daemon's log
is kept in a file; :meth:`Mount.check_log` fails on WARNING/ERROR lines that were not declared
as expected (S3QL's checklogs idea).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def write_config(path: Path, top: dict[str, Any], mirrors: dict[str, dict[str, Any]]) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, opts in mirrors.items():
        lines.append(f"\n[mirrors.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in opts.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it may hold credentials
    return path


def drop_page_cache(path: str | bytes | os.PathLike[str]) -> None:
    """Forget the kernel's cached pages of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: str | bytes | os.PathLike[str]) -> int:
    """How much of a file the kernel holds in its page cache: mincore(2) of a shared map."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if not size:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap of {path!r}")
        try:
            vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path!r}")
            return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Syscall:
    at: float  # wall-clock time of entry (strace -ttt)
    name: str
    path: str  # of the first argument, a file descriptor


def strace_command(out: Path, syscalls: Iterable[str]) -> list[str]:
    """A command prefix that runs the daemon under strace from its start (set it as
    :attr:`Mount.wrapper`), recording ``syscalls`` of every thread with the path of their file
    descriptor argument into ``out``: a test's way to see a call whose effect is invisible until
    a power cut (fsync). Tracing from the start, not attaching later: a thread strace has
    seized but not yet set tracing could make the call unseen. Only those calls stop the
    daemon (seccomp-bpf), so it runs at its usual pace otherwise."""
    return ["strace", "-f", "--seccomp-bpf", "-qq", "-y", "-ttt",
            "-e", "trace=" + ",".join(syscalls), "-o", str(out)]


def read_trace(out: Path) -> list[Syscall]:
    """The calls ``strace_command`` recorded; complete once the daemon has exited."""
    calls = []
    for line in out.read_text(errors="replace").splitlines():
        m = re.match(r"\d+\s+([\d.]+) (\w+)\(\d+<([^>]*)>", line)  # pids are padded
        if m:
            calls.append(Syscall(float(m[1]), m[2], m[3]))
    return calls


def _accepts(path: str) -> bool:
    """Whether a unix socket at ``path`` accepts a connection (closed again at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def is_mounted(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == p for line in f if len(line.split()) > 1)


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], stderr=subprocess.DEVNULL,
                   check=False)


def kill_with_workload(m: Mount, child: int) -> None:
    """SIGKILL the daemon, then the workload, and only then detach the dead mount (a child
    still running after the detach would write into the directory under it)."""
    assert m.proc is not None
    os.killpg(m.proc.pid, signal.SIGKILL)
    m.proc.wait()
    m.proc = None
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    lazy_unmount(m.path)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` on ``path`` (a small disk for ENOSPC tests), unmounted at the end
    even if a daemon still holds it for a moment."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


class Mount:
    """One mirrorfs daemon serving ``path`` from ``config``."""

    def __init__(self, config: Path, path: Path, log: Path,
                 options: Iterable[str] = (), env: dict[str, str] | None = None) -> None:
        self.config = config
        self.path = path
        self.log = log
        self.options = list(options)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_log: list[str] = []
        #: a command prefix for the daemon (e.g. :func:`strace_command`); ``pid`` is then its pid
        self.wrapper: list[str] = []
        self._log_pos = 0

    def start(self, timeout: float = 30.0) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        cmd = [*self.wrapper, sys.executable, "-m", "mirrorfs.cli", "mount", "--foreground",
               str(self.config), str(self.path)]
        for o in self.options:
            cmd += ["-o", o]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        if self.env:
            env.update(self.env)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirrorfs exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("mirrorfs did not mount in time:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.02)
        # The kernel mount comes before the workers and the control socket; as `mirrorfs
        # mount` does (it returns once the daemon is ready), wait for the socket to answer.
        control = self.control_socket()
        while not _accepts(control):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirrorfs exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("mirrorfs mounted but its control socket did not answer:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.02)
        return self

    def control_socket(self) -> str:
        """``<cache_dir>/control.sock``, with cache_dir relative to the config's directory
        as mirrorfs.config reads it."""
        import tomllib

        with open(self.config, "rb") as f:
            cache_dir = tomllib.load(f)["cache_dir"]
        return os.path.join(self.config.resolve().parent, os.path.expanduser(cache_dir),
                            "control.sock")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def umount(self, timeout: float = 60.0) -> int:
        """Clean unmount (as `mirrorfs umount` does); returns the daemon's exit status."""
        if self.proc is None:
            return 0
        subprocess.run(["fusermount3", "-u", str(self.path)], check=False)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.proc = None
        return rc

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.proc = None
        lazy_unmount(self.path)
        return rc

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would, and clear the dead mount."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        lazy_unmount(self.path)

    def restart(self) -> Mount:
        if self.proc is not None:
            self.umount()
        return self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def expect_log(self, pattern: str) -> None:
        self.expected_log.append(pattern)

    def unexpected_log_lines(self) -> list[str]:
        bad = []
        for line in self.log_text().splitlines():
            if re.search(r" (WARNING|ERROR|CRITICAL) ", line) or line.startswith("Traceback"):
                if not any(re.search(p, line) for p in self.expected_log):
                    bad.append(line)
        return bad

    def wait_for(self, predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = predicate()
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout}s")
            time.sleep(interval)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.umount(timeout=30)
            except Exception:
                self.kill()
        lazy_unmount(self.path)
