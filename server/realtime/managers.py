"""python-socketio's Redis manager, guarded against the ways it is known to go quietly deaf."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from engineio import packet as eio_packet
from loguru import logger
from socketio import AsyncManager, AsyncRedisManager
from socketio import packet as sio_packet

PROBE_PREFIX = b"__probe__:"


class DirectEmitManager(AsyncManager):
    """Room emits without a task per recipient.

    python-socketio's emit wraps each recipient's send in a task and waits for them all, though a send only
    puts the packet on that socket's unbounded queue; for a visitor's room of one or two sockets the tasks were
    the largest part of an emit's cost in profiles. Sends go out in turn here; acks (callbacks) keep the
    library's own path.
    """

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: str | None = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: str | None = None,
        **kwargs: Any,
    ) -> None:
        if callback is not None:
            await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, to=to, **kwargs)
            return
        room = to or room
        if namespace not in self.rooms:
            return
        if isinstance(data, tuple):
            args = list(data)
        elif data is not None:
            args = [data]
        else:
            args = []
        skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        encoded = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args]).encode()
        packets = [eio_packet.Packet(eio_packet.MESSAGE, part) for part in (encoded if isinstance(encoded, list) else [encoded])]
        for sid, eio_sid in list(self.get_participants(namespace, room)):
            if sid not in skip:
                for pkt in packets:
                    await self.server._send_eio_packet(eio_sid, pkt)


class GuardedRedisManager(AsyncRedisManager, DirectEmitManager):
    """Rooms and emits across processes, plus a self-addressed probe that proves pub/sub still delivers.

    Guards against python-socketio #1411/#1581 (emits lost while Redis is down, a worker silently deaf
    after its pub/sub connection dropped) and redis-py's read timeout making pub/sub reconnect in a storm:
    the pub/sub connection has no read timeout, and when our own probe stops coming back we say so in
    health and force a reconnect. Local delivery of what pub/sub brings in is DirectEmitManager's.
    """

    def __init__(self, url: str, *, probe_interval: float = 2.0, **kwargs: Any) -> None:
        options = {"socket_timeout": None, "socket_connect_timeout": 5, "socket_keepalive": True, "health_check_interval": 0}
        super().__init__(url, redis_options=options, **kwargs)
        self.probe_interval = probe_interval
        self._probe_id = uuid.uuid4().hex.encode()
        self.last_probe_seen = float("-inf")  # not healthy until our own probe has come back once
        self._first_probe = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """Whether our own probe came back recently."""
        return time.monotonic() - self.last_probe_seen < self.probe_interval * 3 + 1

    def initialize(self) -> None:
        super().initialize()
        if not self.write_only:
            self._probe_task = self.server.start_background_task(self._probe_loop)

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            if isinstance(message, bytes) and message.startswith(PROBE_PREFIX):
                if message[len(PROBE_PREFIX) :] == self._probe_id:
                    self.last_probe_seen = time.monotonic()
                    self._first_probe.set()
                continue
            yield message

    async def _probe_loop(self) -> None:
        """Publish a probe every interval; if it stopped coming back, drop the pub/sub connection to reconnect."""
        while True:
            seen_once = self.last_probe_seen > float("-inf")
            # Until pub/sub has delivered once (the listener subscribes in the background), probe quickly.
            await asyncio.sleep(self.probe_interval if seen_once else 0.1)
            try:
                if self.redis is not None:
                    await self.redis.publish(self.channel, PROBE_PREFIX + self._probe_id)
            except Exception as err:
                logger.warning("socket.io pub/sub probe could not be published: {}", type(err).__name__)
            if not seen_once:
                continue
            if not self.healthy and self.pubsub is not None:
                logger.warning("socket.io pub/sub probe missing: reconnecting the listener")
                with contextlib.suppress(Exception):
                    await self.pubsub.aclose()
                self.connected = False

    async def wait_until_healthy(self, timeout: float) -> bool:
        """At start-up: wait (bounded) until our own probe has come back through pub/sub."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_probe.wait(), timeout)
        return self.healthy

    async def aclose(self) -> None:
        """Stop the listener and the probe and close the manager's Redis connections (clean shutdown)."""
        for task in (getattr(self, "thread", None), self._probe_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, 2)
        for closable in (self.pubsub, self.redis):
            if closable is not None:
                with contextlib.suppress(Exception):
                    await closable.aclose()
