"""Fixtures: real mounts through /dev/fuse, and loopback servers for the mirrors."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mountutil import Mount, write_config

MountFactory = Callable[..., Mount]

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
# moto's request recorder writes to ./moto_recording unless told otherwise
os.environ.setdefault("MOTO_RECORDER_FILEPATH",
                      os.path.join(tempfile.gettempdir(), f"moto-recording-{os.getpid()}"))


@pytest.fixture
def make_mount(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MountFactory]:
    """Build and start mounts; every one is unmounted (or killed) at teardown, and its log is
    checked for unexpected warnings and errors."""
    mounts: list[Mount] = []

    def factory(mirrors: dict[str, dict[str, Any]] | None = None, *, name: str = "m",
                options: list[str] | None = None, start: bool = True,
                env: dict[str, str] | None = None, **top: Any) -> Mount:
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        top.setdefault("cache_dir", str(base / "cache"))
        top.setdefault("log_level", "INFO")
        cfg = write_config(base / "mirrorfs.toml", top, mirrors or {})
        m = Mount(cfg, base / "mnt", base / "daemon.log", options or [], env=env)
        mounts.append(m)
        if start:
            m.start()
        return m

    yield factory
    problems = []
    for m in mounts:
        m.close()
        bad = m.unexpected_log_lines()
        if bad:
            problems.append(f"{m.log}:\n" + "\n".join(bad[:20]))
    rep = getattr(request.node, "rep_call", None)
    if problems and (rep is None or rep.passed):
        pytest.fail("unexpected warnings/errors in the daemon log:\n" + "\n".join(problems))


@pytest.fixture
def mnt(make_mount: MountFactory) -> Mount:
    """A mount with no mirrors, xattrs on."""
    return make_mount(xattrs=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the mount tests need root (FUSE allow_other, a second user)")


# ------------------------------------------------------------------ loopback servers

_bucket_seq = [0]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Any]:
    from tests.servers import MotoS3

    with MotoS3(bucket="mirrorfs-base") as s3:
        yield s3


@pytest.fixture
def s3(moto_server: Any) -> Iterator[Any]:
    """The session's moto server with a fresh bucket for this test (``s3.bucket``)."""
    _bucket_seq[0] += 1
    moto_server.bucket = f"mirror-{os.getpid()}-{_bucket_seq[0]}"
    moto_server.create_bucket(moto_server.bucket)
    yield moto_server
    with contextlib.suppress(OSError):  # a test that started moto's recorder must not slow
        moto_server.stop_recording()  # the rest (it writes every request body to a file)


@pytest.fixture
def ftp(tmp_path: Path) -> Iterator[Any]:
    from tests.servers import PyFtpd

    with PyFtpd(tmp_path / "ftp-root") as server:
        yield server
