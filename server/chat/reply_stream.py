"""Publishing a reply while it is written: coalesced chunks to the room, the text so far in Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from loguru import logger

from server.contract import ChunkEvent, InProgress, InterruptedEvent
from server.realtime.emitter import Emitter
from server.settings import StreamingSettings

TRICKLE_GAP_SECONDS = 0.002  # deltas further apart than this were waited for: the provider is writing as it goes

StreamEvent = ChunkEvent | InterruptedEvent
ReplyListener = Callable[[str, StreamEvent], Awaitable[None]]  # ("chunk" | "interrupted", the event as sent)


class SnapshotStore(Protocol):
    """Where the text written so far is kept, so a client rejoining on another process gets it."""

    async def save_in_flight(self, session_id: str, message_id: str, text: str, index: int, provider: str) -> None:
        """Replace the session's snapshot of the reply being written."""


class ReplyStreams:
    """Opens the stream of each reply with what every stream shares: the emitter, the snapshot store, the settings."""

    def __init__(self, emitter: Emitter, snapshots: SnapshotStore, settings: StreamingSettings) -> None:
        self._emitter = emitter
        self._snapshots = snapshots
        self._settings = settings

    def open(
        self,
        session_id: str,
        message_id: str,
        *,
        listener: ReplyListener | None = None,
        snapshots: bool = True,
        resume_at: int | None = None,
    ) -> ReplyStream:
        """A stream for one reply; `resume_at`: the chunk index a reply taken over from a dead process goes on from."""
        return ReplyStream(
            session_id,
            message_id,
            emitter=self._emitter,
            settings=self._settings,
            snapshots=self._snapshots if snapshots else None,
            listener=listener,
            resume_at=resume_at,
        )


class ReplyStream:
    """Coalesces deltas (at most every `flush_ms`, or at `flush_chars`) so a fast model is not one event per token.

    An answer that is whole within its first flush window (the one its first delta opens, if that delta came
    within `flush_ms` of the start) and under `flush_chars` sends nothing while it is written: no
    `assistant-typing`, no `message-chunk`; its `message-received` alone carries it, as clients expect of any
    message. Otherwise the room hears `assistant-typing` with the first chunk, or `flush_ms` after the start if
    no delta came by then (a slow first token), then the chunks, then `assistant-typing` false.
    """

    def __init__(
        self,
        session_id: str,
        message_id: str,
        *,
        emitter: Emitter,
        settings: StreamingSettings,
        snapshots: SnapshotStore | None = None,
        listener: ReplyListener | None = None,
        resume_at: int | None = None,
    ) -> None:
        self.session_id = session_id
        self.message_id = message_id
        self.provider: str | None = None
        self.text = ""
        self._emitter = emitter
        self._flush_seconds = max(0, settings.flush_ms) / 1000
        self._flush_chars = max(1, settings.flush_chars)
        self._listener = listener
        self._snapshots = snapshots
        self._pending = ""
        # A reply taken over from a process that died goes on under the same id: its first chunk tells clients
        # to drop what the dead process had sent.
        self._pending_reset = resume_at is not None
        self._index = (resume_at or 0) - 1
        self._timer: asyncio.TimerHandle | None = None
        self._timed_flush: asyncio.Task[None] | None = None
        self._trickling = False
        self._last_delta_at = 0.0
        self._delta_gap = 0.0
        self._lock = asyncio.Lock()
        self.snapshot_saved = False
        self._typing = False  # begun: the room is told the assistant is writing, unless the answer is quick
        self._announced = False  # ... and it was
        self._window: asyncio.TimerHandle | None = None  # from the start until the first delta (or `flush_ms`)
        self._announcing: asyncio.Task[None] | None = None

    @property
    def written(self) -> InProgress | None:
        """What the room has been sent so far (`messageId`, `text`, `index`), for a socket joining mid-reply."""
        if not self.text:
            return None
        return {"messageId": self.message_id, "text": self.text, "index": self._index}

    @property
    def unsent(self) -> str:
        """Text taken but not yet sent as a chunk (kept when the reply is cut or stopped)."""
        return self._pending

    @property
    def chunks_sent(self) -> int:
        """How many chunk events went out (a taken-over reply counts from where it resumed)."""
        return self._index + 1

    async def add(self, delta: str, provider: str, reset: bool) -> None:
        """Take one delta; flush now when enough waits, else within `flush_ms`."""
        if reset:
            await self.flush()
            self.text = ""
            self._pending_reset = True
        self.provider = provider
        if self._window is not None:  # the first delta came in time: its own flush window decides from here
            self._window.cancel()
            self._window = None
        now = asyncio.get_running_loop().time()
        self._delta_gap, self._last_delta_at = now - self._last_delta_at, now
        self._pending += delta
        if len(self._pending) >= self._flush_chars or self._flush_seconds == 0:
            await self.flush()
        elif self._timer is None:
            # A timer handle, and a task only if it fires: most short replies end before it does.
            self._timer = asyncio.get_running_loop().call_later(self._flush_seconds, self._flush_due)

    async def pace(self) -> None:
        """For a reply that trickles in, wait for the pending flush before reading on.

        Once a timer has had to flush (the answer is slower than `flush_ms`), nothing is sent before the next
        flush anyway; meanwhile the provider's tokens gather in the socket and are then read and parsed in one
        go instead of waking the reply once per token (100 streams at 100 tokens/s: a large share of the CPU).
        A fast answer never waits here, nor one whose deltas come back to back (already read, only slowed down by
        a busy process).
        """
        if self._trickling and self._timer is not None and self._delta_gap >= TRICKLE_GAP_SECONDS:
            due = self._timer.when()
            self._timer.cancel()  # this task flushes at the due time itself: no timer task per chunk
            self._timer = None
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            await self._flush_in_time()

    def _flush_due(self) -> None:
        self._timer = None
        self._trickling = True
        self._timed_flush = asyncio.create_task(self._flush_in_time())

    async def _flush_in_time(self) -> None:
        """A flush the timer (or pacing) asked for: a failed emit is logged, as the reply itself carries on."""
        try:
            await self.flush()
        except Exception as err:  # a failed emit must not become an orphan task error
            logger.warning("session {}: chunk flush failed: {}", self.session_id, type(err).__name__)

    def _window_over(self) -> None:
        self._window = None
        self._announcing = asyncio.create_task(self._announce_in_time())

    async def _announce_in_time(self) -> None:
        """No delta within `flush_ms` of the start: tell the room the assistant is writing."""
        try:
            async with self._lock:
                await self._announce()
        except Exception as err:  # as a failed chunk flush: logged, the reply carries on
            logger.warning("session {}: typing event failed: {}", self.session_id, type(err).__name__)

    async def _announce(self) -> None:
        """`assistant-typing` true, once, before the first chunk (under the lock)."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if self._typing and not self._announced:
            self._announced = True
            await self._emitter.assistant_typing(self.session_id, True)

    async def flush(self, *, final: bool = False) -> None:
        """Send what waits as one chunk; the snapshot first, so a rejoin never misses text it was not sent.

        The final flush skips the snapshot: the whole message is stored right after it, and a socket that
        joins in between is already in the room when `message-received` goes out. Nor does it send the room
        anything when the room has heard nothing of the reply yet (it came within its first flush window):
        `message-received` will carry the whole answer (a direct listener still gets its chunk).
        """
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._pending:
                return
            delta, self._pending = self._pending, ""
            reset, self._pending_reset = self._pending_reset, False
            self._index += 1
            self.text += delta
            payload: ChunkEvent = {
                "sessionId": self.session_id,
                "messageId": self.message_id,
                "index": self._index,
                "delta": delta,
                "provider": self.provider,
                "reset": reset,
            }
            try:
                if self._snapshots is not None and not final:
                    await self._snapshots.save_in_flight(
                        self.session_id, self.message_id, self.text, self._index, self.provider or ""
                    )
                    self.snapshot_saved = True
            except Exception as err:  # the snapshot only serves rejoins; the live chunk still goes out
                logger.warning("session {}: could not save streamed text: {}", self.session_id, type(err).__name__)
            if not (final and self._typing and not self._announced):
                await self._announce()
                await self._emitter.message_chunk(payload)
            await self._notify("chunk", payload)

    async def interrupted(self, provider: str, reason: str) -> None:
        """Tell the room at once that a provider broke off mid-answer."""
        await self.flush()
        payload: InterruptedEvent = {
            "sessionId": self.session_id,
            "messageId": self.message_id,
            "provider": provider,
            "reason": reason,
        }
        await self._emitter.message_interrupted(payload)
        await self._notify("interrupted", payload)

    async def _notify(self, kind: str, payload: StreamEvent) -> None:
        """Tell the direct listener (an SSE client); one that went away never stops the reply."""
        if self._listener is None:
            return
        try:
            await self._listener(kind, payload)
        except Exception:
            self._listener = None

    async def begin(self) -> None:
        """The reply starts: the room hears `assistant-typing` only once it has to wait (see the class).

        Without coalescing (`flush_ms` 0), and for a reply taken over from a process that died (its clients hold
        that process's text, which the first chunk resets), at once.
        """
        self._typing = True
        if self._flush_seconds == 0 or self._pending_reset:
            await self._announce()
        else:
            self._window = asyncio.get_running_loop().call_later(self._flush_seconds, self._window_over)

    async def end(self) -> None:
        """Send the tail, stop the timers, and tell the room the assistant stopped writing (if it was told it started)."""
        await self.close()
        if self._announced:
            await self._emitter.assistant_typing(self.session_id, False)

    async def close(self) -> None:
        """Send the tail and stop the timers (again: nothing more is sent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in (self._timed_flush, self._announcing):
            if task is not None and not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._window is not None:  # ended before any delta (stopped, failed): nothing to announce
            self._window.cancel()
            self._window = None
        await self.flush(final=True)
