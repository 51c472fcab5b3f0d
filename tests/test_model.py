"""Issue 6: a model-based test. Random sequences of operations run on the real mount and on a
plain directory side by side; after every step both must show the same tree, contents,
modes, symlinks and -- for every operation -- the same result or the same errno.

The mount has a directory mirror and ``upload_delay = 0``, so an ``evict`` step (drain, then
evict everything, through the control socket the ``mirrorfs`` command uses) turns every
file remote-only; the steps after it then write, truncate, rename and read files that have
to be fetched back. After each drain the mirror must hold exactly the local regular files.
A ``remount`` step unmounts cleanly and mounts again.

Hypothesis drives it (``RuleBasedStateMachine``) and shrinks a failure to a short list of
steps, printed as code. The seed is printed; ``MIRRORFS_MODEL_SEED`` replays it, and
``MIRRORFS_MODEL_EXAMPLES`` / ``MIRRORFS_MODEL_STEPS`` make the run longer.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import shutil
import stat
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from mirrorfs.control import ControlClient
from tests.mountutil import Mount, write_config

EXAMPLES = int(os.environ.get("MIRRORFS_MODEL_EXAMPLES", "15"))
STEPS = int(os.environ.get("MIRRORFS_MODEL_STEPS", "25"))

NAMES = ["a", "b"]
PATHS = [os.path.join(*p) for n in (1, 2, 3) for p in itertools.product(NAMES, repeat=n)]
#: symlink targets stay inside the tree (no "..", no absolute path that exists)
TARGETS = ["a", "b", "a/b", "b/a", "zz", "/nonexistent-mirrorfs-model/x"]
MODES = [0o600, 0o644, 0o755, 0o700, 0o444, 0o640]
OFFSETS = [0, 1, 4095, 4096, 70_000, 5 * 1024 * 1024 - 3]
SIZES = [0, 1, 10, 4096, 65_537, 200_000]

#: shallow paths drawn more often than deep ones, so that most steps find what they act on
paths = st.sampled_from([p for p in PATHS for _ in range(4 >> p.count("/"))])


def payload(size: int, salt: int) -> bytes:
    return random.Random(salt).randbytes(size)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


def snapshot(root: Path, contents: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything the model compares, keyed by relative path (symlinks are not followed)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            mode = st_.st_mode
            if stat.S_ISLNK(mode):
                out[rel] = ("link", os.readlink(p), st_.st_size)
            elif stat.S_ISDIR(mode):
                out[rel] = ("dir", stat.S_IMODE(mode), st_.st_nlink)
            else:
                data = b""
                if contents:
                    with open(p, "rb") as f:
                        data = f.read()
                    assert len(data) == st_.st_size, f"{rel}: stat size vs bytes read"
                out[rel] = ("file", stat.S_IMODE(mode), st_.st_size, data)
    return out


def regular_files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode) and not name.startswith(".mirrorfs-"):
                out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


class ModelFS(RuleBasedStateMachine):
    base: ClassVar[Path]
    counter: ClassVar[itertools.count[int]] = itertools.count()
    #: rules run and errno results seen, over all examples (printed by the test)
    tally: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.dir = self.base / f"ex{n}"
        self.ref = self.dir / "ref"
        self.mirror = self.dir / "mirror"
        for d in (self.ref, self.mirror):
            d.mkdir(parents=True)
        cfg = write_config(self.dir / "mirrorfs.toml",
                           {"cache_dir": str(self.dir / "cache"), "upload_delay": 0,
                            "log_level": "INFO"},
                           {"dir": {"type": "dir", "path": str(self.mirror)}})
        self.m = Mount(cfg, self.dir / "mnt", self.dir / "daemon.log")
        # pyfuse3's own line when the reply to a RELEASE sent just before an unmount finds
        # the request gone (the kernel dropped it with the connection): benign
        self.m.expect_log(r"fuse_release\(\): fuse_reply_\* failed with No such file")
        self.m.start()
        self.count("examples")
        self.contents_known = True
        self.salt = 0

    def teardown(self) -> None:
        try:
            if self.m.proc is not None:
                assert self.m.umount() == 0, "the daemon exited with an error"
            bad = self.m.unexpected_log_lines()
            assert not bad, "unexpected warnings/errors in the daemon log:\n" + "\n".join(bad)
        finally:
            self.m.close()
            # keep the daemon log (a failing example is replayed several times while it
            # shrinks; each replay has its own directory), drop the rest
            for d in ("cache", "ref", "mirror", "mnt"):
                shutil.rmtree(self.dir / d, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def count(self, what: str) -> None:
        self.tally[what] = self.tally.get(what, 0) + 1

    def both(self, fn: Any, *rel: str, extra: tuple[Any, ...] = ()) -> None:
        got = outcome(fn, *[self.m.path / r for r in rel], *extra)
        want = outcome(fn, *[self.ref / r for r in rel], *extra)
        assert got == want, f"{fn.__name__}{rel}{extra}: mirrorfs {got}, directory {want}"
        self.count("steps")
        self.count("ok" if got[0] == "ok" else f"errno {got[1]}")

    def ctl(self, cmd: str, **args: Any) -> Any:
        c = ControlClient(str(self.dir / "cache"), timeout=None)
        try:
            return c.call(cmd, **args)
        finally:
            c.close()

    # ------------------------------------------------------------------ rules

    @rule(path=paths, off=st.sampled_from(OFFSETS), size=st.sampled_from(SIZES),
          trunc=st.booleans())
    def write(self, path: str, off: int, size: int, trunc: bool) -> None:
        self.salt += 1
        data = payload(size, self.salt)

        def do(p: Path) -> int:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0), 0o644)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)

        self.both(do, path)

    @rule(path=paths, size=st.sampled_from(SIZES))
    def create(self, path: str, size: int) -> None:
        """A second way to write (weights creation up: most steps should find things)."""
        self.salt += 1
        data = payload(size, self.salt)

        def do(p: Path) -> None:
            p.write_bytes(data)

        self.both(do, path)

    @rule(path=paths, size=st.sampled_from(SIZES))
    def append(self, path: str, size: int) -> None:
        self.salt += 1
        data = payload(size, self.salt)

        def do(p: Path) -> int:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both(do, path)

    @rule(path=paths, size=st.sampled_from([0, 1, 5000, 300_000]))
    def truncate(self, path: str, size: int) -> None:
        self.both(os.truncate, path, extra=(size,))

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(os.rename, src, dst)

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(os.unlink, path)

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(os.mkdir, path, extra=(0o755,))

    @rule(path=paths)
    def makedirs(self, path: str) -> None:
        self.both(os.makedirs, path, extra=(0o755, True))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(os.rmdir, path)

    @rule(path=paths, mode=st.sampled_from(MODES))
    def chmod(self, path: str, mode: int) -> None:
        self.both(os.chmod, path, extra=(mode,))

    @rule(path=paths, to=st.sampled_from(TARGETS), now=st.integers(0, 2))
    def symlink(self, path: str, to: str, now: int) -> None:
        if now != 2:
            return  # a symlink in a path turns most later steps into ENOTDIR/ELOOP
        def do(p: Path) -> None:
            os.symlink(to, p)

        self.both(do, path)

    @rule(path=paths, off=st.sampled_from([0, 4096, 70_000]), size=st.sampled_from([1, 9000]))
    def read(self, path: str, off: int, size: int) -> None:
        def do(p: Path) -> bytes:
            fd = os.open(p, os.O_RDONLY)
            try:
                return os.pread(fd, size, off)
            finally:
                os.close(fd)

        self.both(do, path)

    @rule(now=st.integers(0, 2))
    def evict(self, now: int) -> None:
        if now != 2:
            return  # rules are drawn evenly; this one should run about a third as often
        r = self.ctl("drain", timeout=60)
        assert r["drained"] and not r["failed"], r
        assert regular_files(self.mirror) == regular_files(self.m.path), \
            "after a drain the directory mirror differs from the mount"
        r = self.ctl("evict", paths=[""])
        assert not r["kept"], r
        for rel in regular_files(self.m.path):  # let the next reads reach the daemon
            with contextlib.suppress(OSError):
                fd = os.open(self.m.path / rel, os.O_RDONLY | os.O_NOFOLLOW)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        self.contents_known = False  # the next check compares metadata only
        self.count("steps")
        self.count("evict")

    @rule(now=st.integers(0, 2))
    def remount(self, now: int) -> None:
        if now != 2:
            return
        assert self.m.umount() == 0
        self.m.start()
        self.count("steps")
        self.count("remount")

    @invariant()
    def same_tree(self) -> None:
        contents, self.contents_known = self.contents_known, True
        assert snapshot(self.m.path, contents) == snapshot(self.ref, contents)


def test_model_matches_a_plain_directory(tmp_path: Path) -> None:
    s = int(os.environ.get("MIRRORFS_MODEL_SEED") or random.randrange(1 << 32))
    print(f"model test seed {s} (rerun with MIRRORFS_MODEL_SEED={s}); "
          f"{EXAMPLES} examples x {STEPS} steps")
    ModelFS.base = tmp_path
    machine = hypothesis_seed(s)(ModelFS)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), print_blob=True))
    print(f"model test: {dict(sorted(ModelFS.tally.items()))}")
