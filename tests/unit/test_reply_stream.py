"""Reply streaming as clients see it: coalesced chunks, in order, nothing lost, through the real Emitter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.chat.reply_stream import ReplyStream
from server.realtime.emitter import Emitter
from server.settings import StreamingSettings
from tests.fakes import RecordingServer


class Snapshots:
    """A snapshot store that records (or refuses) what the stream saves for rejoins."""

    def __init__(self, server: RecordingServer, *, broken: bool = False) -> None:
        self.server = server
        self.broken = broken
        self.saved: list[tuple[str, int]] = []

    async def save_in_flight(self, session_id: str, message_id: str, text: str, index: int, provider: str) -> None:
        if self.broken:
            raise ConnectionError("redis went away")
        self.saved.append((text, index))
        self.server.sent.append(("snapshot", {"index": index}, None, None))  # to check it precedes its chunk


def stream(server: RecordingServer, *, flush_ms: int = 40, flush_chars: int = 64, **options: Any) -> ReplyStream:
    settings = StreamingSettings(flush_ms=flush_ms, flush_chars=flush_chars)
    return ReplyStream("s1", "m1", emitter=Emitter(server), settings=settings, **options)  # type: ignore[arg-type]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks)


async def test_fast_deltas_are_coalesced_and_nothing_is_lost() -> None:
    server = RecordingServer()
    reply = stream(server, flush_chars=64)
    await reply.begin()
    for i in range(200):
        await reply.add(f"t{i} ", "openai", False)
    await reply.end()
    chunks = server.events("message-chunk")
    expected = "".join(f"t{i} " for i in range(200))
    assert text_of(chunks) == expected == reply.text
    assert len(chunks) <= len(expected) // 64 + 1  # one event per 64 characters, not one per token
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["sessionId"] == "s1" and c["messageId"] == "m1" and c["provider"] == "openai" for c in chunks)
    typing = server.events("assistant-typing")
    assert [t["typing"] for t in typing] == [True, False]
    assert server.sent[0][0] == "assistant-typing" and server.sent[-1][0] == "assistant-typing"


async def test_without_coalescing_every_delta_is_a_chunk() -> None:
    server = RecordingServer()
    reply = stream(server, flush_ms=0, flush_chars=1)
    for word in ["a", "bb", "ccc"]:
        await reply.add(word, "gemini", False)
    await reply.close()
    assert [c["delta"] for c in server.events("message-chunk")] == ["a", "bb", "ccc"]


async def test_a_slow_delta_goes_out_when_its_flush_is_due_without_waiting_for_more() -> None:
    server = RecordingServer()
    reply = stream(server, flush_ms=5, flush_chars=1000)
    await reply.add("hello", "openai", False)
    assert server.events("message-chunk") == []  # held for the flush interval
    await server.next_event()
    assert [c["delta"] for c in server.events("message-chunk")] == ["hello"]
    await reply.close()


async def test_a_provider_switch_resets_the_text_and_says_so_on_the_next_chunk() -> None:
    server = RecordingServer()
    reply = stream(server, flush_chars=1000)
    await reply.add("half an answer", "openai", False)
    await reply.add("Fresh ", "gemini", True)
    await reply.add("answer", "gemini", False)
    await reply.close()
    chunks = server.events("message-chunk")
    assert [(c["delta"], c["reset"], c["provider"]) for c in chunks] == [
        ("half an answer", False, "openai"),
        ("Fresh answer", True, "gemini"),
    ]
    assert reply.text == "Fresh answer"


async def test_the_snapshot_is_saved_before_its_chunk_and_the_final_flush_skips_it() -> None:
    server = RecordingServer()
    snapshots = Snapshots(server)
    reply = stream(server, flush_chars=4, snapshots=snapshots)
    await reply.add("abcd", "openai", False)
    await reply.add("ef", "openai", False)
    await reply.close()
    kinds = [event for event, *_ in server.sent]
    assert kinds == ["snapshot", "message-chunk", "message-chunk"]
    assert snapshots.saved == [("abcd", 0)]
    assert reply.snapshot_saved


async def test_a_failing_snapshot_store_never_stops_the_live_chunks() -> None:
    server = RecordingServer()
    reply = stream(server, flush_chars=2, snapshots=Snapshots(server, broken=True))
    await reply.add("ab", "openai", False)
    await reply.close()
    assert text_of(server.events("message-chunk")) == "ab"
    assert not reply.snapshot_saved


async def test_a_listener_that_fails_is_dropped_and_the_reply_goes_on() -> None:
    server = RecordingServer()
    heard: list[str] = []

    async def listener(kind: str, payload: Any) -> None:
        heard.append(payload["delta"])
        raise BrokenPipeError("the SSE client went away")

    reply = stream(server, flush_chars=1, listener=listener)
    await reply.add("a", "openai", False)
    await reply.add("b", "openai", False)
    await reply.close()
    assert heard == ["a"]
    assert text_of(server.events("message-chunk")) == "ab"


async def test_an_interruption_flushes_what_was_written_first() -> None:
    server = RecordingServer()
    reply = stream(server, flush_chars=1000)
    await reply.add("partial", "openai", False)
    await reply.interrupted("openai", "stalled")
    names = [event for event, *_ in server.sent]
    assert names == ["message-chunk", "message-interrupted"]
    assert server.events("message-interrupted")[0] == {
        "sessionId": "s1",
        "messageId": "m1",
        "provider": "openai",
        "reason": "stalled",
    }


@pytest.mark.parametrize("resume_at", [0, 7])
async def test_a_reply_taken_over_goes_on_from_its_index_and_tells_clients_to_reset(resume_at: int) -> None:
    server = RecordingServer()
    reply = stream(server, flush_chars=1, resume_at=resume_at)
    await reply.add("x", "gemini", False)
    await reply.add("y", "gemini", False)
    await reply.close()
    chunks = server.events("message-chunk")
    assert [(c["index"], c["reset"]) for c in chunks] == [(resume_at, True), (resume_at + 1, False)]
    assert reply.chunks_sent == resume_at + 2


async def test_an_answer_whole_within_the_first_window_sends_the_room_nothing_but_its_listener_gets_it() -> None:
    server = RecordingServer()
    heard: list[str] = []

    async def listener(kind: str, payload: Any) -> None:
        heard.append(payload["delta"])

    reply = stream(server, flush_ms=1000, listener=listener)
    await reply.begin()
    for word in ["Echo: ", "hello"]:
        await reply.add(word, "openai", False)
    await reply.end()
    assert server.sent == []  # message-received alone will carry it
    assert reply.text == "Echo: hello" and heard == ["Echo: hello"]


async def test_a_slow_answer_is_announced_when_the_first_window_ends() -> None:
    server = RecordingServer()
    reply = stream(server, flush_ms=5, flush_chars=1000)
    await reply.begin()
    assert server.sent == []
    await server.next_event()
    assert server.events("assistant-typing") == [{"sessionId": "s1", "typing": True}]
    await reply.add("late", "openai", False)
    await reply.end()
    assert [event for event, *_ in server.sent] == ["assistant-typing", "message-chunk", "assistant-typing"]
    assert [t["typing"] for t in server.events("assistant-typing")] == [True, False]


async def test_a_long_answer_within_the_first_window_is_announced_before_its_first_chunk() -> None:
    server = RecordingServer()
    reply = stream(server, flush_ms=1000, flush_chars=8)
    await reply.begin()
    await reply.add("0123456789", "openai", False)
    await reply.add("tail", "openai", False)
    await reply.end()
    names = [event for event, *_ in server.sent]
    assert names == ["assistant-typing", "message-chunk", "message-chunk", "assistant-typing"]
    assert text_of(server.events("message-chunk")) == "0123456789tail"


async def test_the_first_delta_opens_the_window_that_decides() -> None:
    """A first token within `flush_ms` of the start, and the rest within `flush_ms` of it: still nothing sent."""
    server = RecordingServer()
    reply = stream(server, flush_ms=300)
    await reply.begin()
    await asyncio.sleep(0.2)
    await reply.add("Echo: ", "openai", False)
    await asyncio.sleep(0.15)  # 350 ms after the start, 150 after the first delta
    await reply.add("hello", "openai", False)
    await reply.end()
    assert server.sent == [] and reply.text == "Echo: hello"
