"""PacketQueue, the per-session queue behind every Engine.IO socket: asyncio.Queue's behaviour at a fraction of its size."""

from __future__ import annotations

import asyncio
import sys

import pytest

from server.realtime.engine_socket import COMPACT_AFTER, PacketQueue


async def test_items_come_out_in_order_and_get_waits_for_one() -> None:
    queue = PacketQueue()
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_nowait("a")
    await queue.put("b")
    assert await waiting == "a"
    assert queue.qsize() == 1 and not queue.empty()
    assert queue.get_nowait() == "b"
    assert queue.empty()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_a_long_burst_keeps_its_order_and_the_list_is_cut_as_it_is_read() -> None:
    queue = PacketQueue()
    for n in range(1000):
        queue.put_nowait(n)
    taken = [queue.get_nowait() for _ in range(500)]
    for n in range(1000, 1200):
        queue.put_nowait(n)
    taken += [await queue.get() for _ in range(700)]
    assert taken == list(range(1200))
    assert queue.empty() and queue._items == [] and queue._head == 0
    queue.put_nowait("again")
    assert queue.get_nowait() == "again"
    # what was read is cut off the front, so a queue that is never quite empty does not keep it all
    queue.put_nowait("first")
    for n in range(COMPACT_AFTER * 10):
        queue.put_nowait(n)
        queue.get_nowait()
        assert queue._head <= COMPACT_AFTER
    for n in range(COMPACT_AFTER * 10):
        queue.put_nowait(n)
        queue.put_nowait(n)
        queue.get_nowait()
        assert queue._head <= max(COMPACT_AFTER, queue.qsize())
    assert queue.qsize() == COMPACT_AFTER * 10 + 1


async def test_a_cancelled_get_leaves_the_item_for_the_next_getter() -> None:
    queue = PacketQueue()
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("x")  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs: the item goes to `second`
    assert await second == "x"
    assert first.cancelled()
    assert queue._getters == []


async def test_wait_for_with_a_timeout_leaves_no_getter_behind() -> None:
    queue = PacketQueue()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), 0.01)
    assert queue._getters == []
    queue.put_nowait(1)
    assert await asyncio.wait_for(queue.get(), 1) == 1


async def test_join_waits_until_every_item_is_marked_done() -> None:
    queue = PacketQueue()
    await asyncio.wait_for(queue.join(), 1)  # nothing put: returns at once
    queue.put_nowait(1)
    queue.put_nowait(2)
    joined = asyncio.ensure_future(queue.join())
    queue.get_nowait()
    queue.task_done()
    await asyncio.sleep(0)
    assert not joined.done()
    queue.get_nowait()
    queue.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError):
        queue.task_done()


def test_it_is_small() -> None:
    """An idle session's queue: the reason this class exists (asyncio.Queue is about 3.3 KB with its four deques)."""
    queue = PacketQueue()
    size = sys.getsizeof(queue) + sys.getsizeof(queue._items) + sys.getsizeof(queue._getters)
    assert size < 300
