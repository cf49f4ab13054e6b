"""python-socketio's Redis manager, guarded against the ways it is known to go quietly deaf."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import orjson
from engineio import packet as eio_packet
from loguru import logger
from redis import asyncio as aioredis
from socketio import AsyncManager, AsyncRedisManager
from socketio import packet as sio_packet

PROBE_PREFIX = b"__probe__:"
PUBLISH_CONNECTIONS = 32  # the manager's connections to Redis: the listener holds one, publishes share the rest
PUBLISH_WAIT = 10.0  # seconds a publish waits for one of them before it counts as failed


class DirectEmitManager(AsyncManager):
    """Room emits without a task per recipient, encoded once, straight to each socket's queue.

    python-socketio's emit wraps each recipient's send in a task and waits for them all, though a send only
    puts the packet on that socket's unbounded queue; for a visitor's room of one or two sockets the tasks were
    the largest part of an emit's cost in profiles. Its packet class then scans the payload for binary parts
    (a recursive walk over every value: half of what remained) and builds the frame in three string steps. Here a
    packet is encoded once, by orjson, into the Engine.IO frame itself (`42<json>`, the namespace after the 2) and
    that one frame goes to every recipient in turn. orjson refuses bytes, so a payload with binary parts (and
    anything else orjson cannot encode) takes the library's own encoding, attachments and all; acks (callbacks)
    keep the library's own path.
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
        rooms = self.rooms.get(namespace)
        if rooms is None:
            return
        if room is None or isinstance(room, str):
            members = rooms.get(room)
            if not members:
                return
            # A copy, as sends may yield and the room change meanwhile; the library copies it too (its _fwdm).
            recipients: tuple[tuple[str, str], ...] = tuple(members._fwdm.items())
        else:  # a list of rooms
            recipients = tuple(self.get_participants(namespace, room))
        packets = self._frames(event, data, namespace)
        send = self.server.eio.send_packet
        skip = skip_sid if isinstance(skip_sid, list) else (skip_sid,)
        for sid, eio_sid in recipients:
            if sid not in skip:
                for pkt in packets:
                    await send(eio_sid, pkt)

    def _frames(self, event: str, data: Any, namespace: str) -> tuple[eio_packet.Packet, ...]:
        """The Engine.IO packet(s) of one event: one text frame, encoded once (see the class)."""
        if isinstance(data, tuple):
            args = [event, *data]
        elif data is not None:
            args = [event, data]
        else:
            args = [event]
        try:
            body = orjson.dumps(args)
        except TypeError:  # bytes (binary attachments), integers beyond 64 bits: the library's encoding
            encoded = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=args).encode()
            parts = encoded if isinstance(encoded, list) else [encoded]
            return tuple(eio_packet.Packet(eio_packet.MESSAGE, part) for part in parts)
        head = b"42" if namespace == "/" else b"42" + namespace.encode() + b","
        frame = (head + body).decode()
        pkt = eio_packet.Packet(eio_packet.MESSAGE, frame)
        pkt.encode_cache = frame  # what Packet.encode() returns from now on: "4" + the Socket.IO packet
        return (pkt,)


class GuardedRedisManager(AsyncRedisManager, DirectEmitManager):
    """Rooms and emits across processes, plus a self-addressed probe that proves pub/sub still delivers.

    Guards against python-socketio #1411/#1581 (emits lost while Redis is down, a worker silently deaf
    after its pub/sub connection dropped) and redis-py's read timeout making pub/sub reconnect in a storm:
    the pub/sub connection has no read timeout, and when our own probe stops coming back we say so in
    health and force a reconnect. Local delivery of what pub/sub brings in is DirectEmitManager's.
    """

    def __init__(self, url: str, *, probe_interval: float = 2.0, **kwargs: Any) -> None:
        options = {"socket_timeout": None, "socket_connect_timeout": 5, "socket_keepalive": True, "health_check_interval": 0}
        if url.startswith("unix://"):  # the embedded Redis that WORKERS share: no TCP keepalive on a unix socket
            del options["socket_keepalive"]
        super().__init__(url, redis_options=options, **kwargs)
        self.probe_interval = probe_interval
        self._probe_id = uuid.uuid4().hex.encode()
        self.last_probe_seen = float("-inf")  # not healthy until our own probe has come back once
        self._first_probe = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None

    def _redis_connect(self) -> None:
        """The library's client, but publishes wait for a free connection instead of failing.

        The library builds its client with redis-py's default pool, which raises MaxConnectionsError once 100
        publishes are in flight; the library then treats that as a lost connection, builds a new client (leaving
        the old pool's connections open) and after one retry drops the emit, logging only "giving up". Many
        concurrent replies (WORKERS, bursts) reach that. A blocking pool makes a burst queue for up to
        `PUBLISH_WAIT` seconds instead. The previous client is not closed on a reconnect: the listener may still
        be reading from its pub/sub connection. Sentinel URLs keep the library's own path (its pool is Sentinel's).
        """
        if urlparse(self.redis_url).scheme.lower() not in ("redis", "rediss", "unix"):
            super()._redis_connect()
            return
        pool = aioredis.BlockingConnectionPool.from_url(
            self.redis_url, max_connections=PUBLISH_CONNECTIONS, timeout=PUBLISH_WAIT, **self.redis_options
        )
        self.redis = aioredis.Redis.from_pool(pool)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

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
