"""The write-behind buffer against a flaky store: nothing acknowledged is lost, nothing is stored twice, order holds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server.contract import Message, new_message
from server.storage.errors import BufferFull, SessionGone
from server.storage.messages import AppendResult
from server.storage.spool import Spool
from server.storage.write_behind import POISON_ATTEMPTS, WriteBehindStore


class FlakyMessages:
    """A MessageStore that is down when told, and records what reaches it, in order."""

    def __init__(self) -> None:
        self.down = False
        self.gone: set[str] = set()  # sessions that vanished
        self.broken = 0  # how many more writes fail with a bug-like error
        self.stored: list[tuple[str, str]] = []  # (kind, message id)
        self.history: dict[str, list[Message]] = {}

    def _check(self, session_id: str) -> None:
        if self.down:
            raise RedisConnectionError("connection refused")
        if session_id in self.gone:
            raise SessionGone(session_id)
        if self.broken:
            self.broken -= 1
            raise ValueError("a bug")

    async def append(self, session_id: str, message: Message, **_: Any) -> AppendResult:
        self._check(session_id)
        context = list(self.history.get(session_id, []))
        self.history.setdefault(session_id, []).append(message)
        self.stored.append(("append", message["id"]))
        return AppendResult(message=message, duplicate=False, context=context, state="active")

    async def finish_reply(self, session_id: str, messages: list[Message], **_: Any) -> None:
        self._check(session_id)
        self.history.setdefault(session_id, []).extend(messages)
        self.stored.extend(("finish", m["id"]) for m in messages)


def buffer(store: FlakyMessages, **options: Any) -> WriteBehindStore:
    return WriteBehindStore(store, capacity=options.pop("capacity", 100), retry_interval=0.001, **options)  # type: ignore[arg-type]


async def written_out(wb: WriteBehindStore) -> None:
    """Until the buffer is empty (the flusher retries every millisecond here)."""
    for _ in range(2000):
        if wb.depth == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{wb.depth} writes still buffered")


def user(session_id: str, text: str) -> Message:
    return new_message(session_id, "user", text)


async def test_writes_during_an_outage_are_stored_in_order_once_redis_is_back() -> None:
    store = FlakyMessages()
    wb = buffer(store)
    first = user("s1", "before")
    await wb.append("s1", first)
    store.down = True
    during = [user("s1", f"during {i}") for i in range(3)]
    results = [await wb.append("s1", m, context_size=10) for m in during]
    reply = new_message("s1", "assistant", "an answer")
    await wb.finish_reply("s1", [reply])
    assert wb.depth == 4 and [m["id"] for m in store.history["s1"]] == [first["id"]]
    # The AI still gets the conversation's context from what this process saw.
    assert [m["content"] for m in results[-1].context] == ["before", "during 0", "during 1"]
    store.down = False
    await written_out(wb)
    assert [mid for _, mid in store.stored] == [first["id"], *(m["id"] for m in during), reply["id"]]


async def test_once_anything_waits_later_writes_queue_behind_it_even_if_redis_answers() -> None:
    store = FlakyMessages()
    wb = buffer(store)
    store.down = True
    a = user("s1", "a")
    await wb.append("s1", a)
    store.down = False  # Redis is back, but the flusher has not written `a` yet
    b = user("s1", "b")
    await wb.append("s1", b)
    await written_out(wb)
    assert [mid for _, mid in store.stored] == [a["id"], b["id"]]


async def test_a_retried_client_message_id_is_a_duplicate_while_buffered() -> None:
    store = FlakyMessages()
    wb = buffer(store)
    store.down = True
    first = await wb.append("s1", user("s1", "hi"), client_message_id="c-1")
    again = await wb.append("s1", user("s1", "hi"), client_message_id="c-1")
    assert not first.duplicate and again.duplicate and again.message["id"] == first.message["id"]
    assert wb.depth == 1


async def test_a_full_buffer_refuses_instead_of_dropping() -> None:
    store = FlakyMessages()
    wb = buffer(store, capacity=2)
    store.down = True
    await wb.append("s1", user("s1", "1"))
    await wb.append("s1", user("s1", "2"))
    with pytest.raises(BufferFull) as refused:
        await wb.append("s1", user("s1", "3"))
    assert refused.value.retry_after > 0
    store.down = False
    await written_out(wb)
    assert len(store.stored) == 2


async def test_a_write_for_a_vanished_session_is_dropped_at_once_and_the_rest_goes_on() -> None:
    store = FlakyMessages()
    wb = buffer(store)
    store.down = True
    await wb.append("gone", user("gone", "lost with its session"))
    kept = user("s2", "kept")
    await wb.append("s2", kept)
    store.gone.add("gone")
    store.down = False
    await written_out(wb)
    assert store.stored == [("append", kept["id"])]


async def test_a_write_that_keeps_failing_is_retried_then_dropped_without_blocking_the_others() -> None:
    store = FlakyMessages()
    wb = buffer(store)
    store.down = True
    await wb.append("s1", user("s1", "poison"))
    after = user("s1", "after")
    await wb.append("s1", after)
    store.broken = POISON_ATTEMPTS
    store.down = False
    await written_out(wb)
    assert store.stored == [("append", after["id"])]


async def test_buffered_writes_survive_the_process_in_its_spool(tmp_path: Path) -> None:
    unreachable = FlakyMessages()
    unreachable.down = True
    dying = buffer(unreachable, spool=Spool(tmp_path, "dead-process"))
    message = user("s1", "acknowledged during the outage")
    await dying.append("s1", message)
    await dying.drain(timeout=0)  # the process goes away with the write still buffered: only the spool has it
    store = FlakyMessages()
    heir = buffer(store, spool=Spool(tmp_path, "next-process"))
    assert heir.adopt_orphans() == 1
    await written_out(heir)
    assert store.stored == [("append", message["id"])]
    await heir.drain(timeout=1)
