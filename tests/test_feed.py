"""Bounded feeds: every waiter is served, nothing grows without bound, anyio's names."""

from __future__ import annotations

import anyio
import pytest

from kvmflow.errors import DeadlineError, EndOfSubscription, MisuseError
from kvmflow.feed import BoundedFeed

pytestmark = pytest.mark.anyio


async def test_two_waiters_and_two_items_both_wake() -> None:
    # The feed once had a single wake-up slot: the second waiter overwrote the first, which
    # then slept forever while an item sat queued.
    feed: BoundedFeed[int] = BoundedFeed()
    got: list[int] = []

    async def waiter() -> None:
        got.append(await feed.receive())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert feed.statistics().tasks_waiting_receive == 2
            feed.push(1)
            feed.push(2)
    assert sorted(got) == [1, 2]
    assert feed.pending() == 0
    assert feed.statistics().tasks_waiting_receive == 0


async def test_many_waiters_one_item_then_close_ends_the_rest() -> None:
    feed: BoundedFeed[str] = BoundedFeed()
    outcomes: list[str] = []

    async def waiter() -> None:
        try:
            outcomes.append(await feed.receive())
        except EndOfSubscription:
            outcomes.append("ended")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            feed.push("item")
            await anyio.wait_all_tasks_blocked()
            assert outcomes == ["item"]  # the other four wait again, none lost the item
            feed.close()
    assert sorted(outcomes) == ["ended"] * 4 + ["item"]


async def test_a_waiter_that_times_out_is_forgotten() -> None:
    feed: BoundedFeed[int] = BoundedFeed()
    with pytest.raises(DeadlineError, match="waiting for the next item"):
        await feed.receive(timeout=0.01)
    assert not await feed.wait_ready(0.01)
    assert feed.statistics().tasks_waiting_receive == 0


async def test_full_feed_drops_the_oldest_and_counts() -> None:
    feed: BoundedFeed[int] = BoundedFeed(max_buffered=3)
    for n in range(5):
        feed.push(n)
    stats = feed.statistics()
    assert (stats.current_buffer_used, stats.max_buffer_size, stats.dropped) == (3, 3, 2)
    assert feed.receive_nowait() == 2
    assert feed.drain() == [3, 4]
    with pytest.raises(anyio.WouldBlock):
        feed.receive_nowait()
    feed.close()
    feed.push(9)  # ignored once closed
    with pytest.raises(EndOfSubscription):
        feed.receive_nowait()
    assert [item async for item in feed] == []


def test_a_feed_needs_room_for_one_item() -> None:
    with pytest.raises(MisuseError, match="max_buffered must be at least 1, got 0"):
        BoundedFeed(0)
