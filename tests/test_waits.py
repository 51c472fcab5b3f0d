"""Tasks that wait for another task wake on its event, not on a timer: BusyKeys (a key's
release), Journal.changed (a job's end)."""

from __future__ import annotations

import stat
from pathlib import Path

import trio
import trio.testing

from mirrorfs.admin import until_changed
from mirrorfs.busy import BusyKeys
from mirrorfs.cache.db import ROOT_INO, Database
from mirrorfs.cache.registry import MirrorRule, Registry
from mirrorfs.cache.store import Store
from mirrorfs.config import Config
from mirrorfs.daemon import Daemon


def test_holding_waits_for_the_release_and_not_for_a_timer() -> None:
    async def main() -> None:
        busy = BusyKeys()
        busy[b"k"] = 7  # an upload holds the key
        order: list[str] = []

        async def waiter() -> None:
            async with busy.holding(b"k", 9):
                order.append(f"held by {busy[b'k']}")
            order.append("released")

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and busy[b"k"] == 7
            del busy[b"k"]  # the upload is done
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["held by 9", "released"] and b"k" not in busy

    # MockClock without autojump: a waiter that polled with sleep would never wake
    trio.run(main, clock=trio.testing.MockClock())


def test_a_drain_wakes_when_the_uploader_finishes_a_job(tmp_path: Path) -> None:
    """admin.until_changed returns at the job's completion, not at its recheck timer."""
    reg = Registry(Database(str(tmp_path / "meta")), [MirrorRule(0, "m")], 0.0)
    node = reg.mknode(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    d = Daemon(Config.__new__(Config), "", reg.db, reg, Store(str(tmp_path / "data")), None)

    async def main() -> None:
        woke: list[float] = []

        async def drain_round() -> None:
            await until_changed(d)
            woke.append(trio.current_time())

        async with trio.open_nursery() as n:
            n.start_soon(drain_round)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.3)  # (mock time) nothing happened: still waiting
            assert woke == []
            with reg.db.begin(write=True) as txn:  # the uploader finishes the job
                job = reg.journal.claim(txn, 0, node.ino)
                assert job is not None
                reg.job_done(txn, 0, node.ino, job.seq)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == [0.3]  # at once, not at the 1 s recheck

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
