"""BusyKeys: a task waiting for a key wakes when the holder releases it (no polling)."""

from __future__ import annotations

import trio
import trio.testing

from mirrorfs.busy import BusyKeys


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
