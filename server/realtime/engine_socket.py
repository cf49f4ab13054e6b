"""An Engine.IO session that costs little while it idles: what GuardedEngineIO builds for every connection.

engine.io's own AsyncSocket keeps, for each idle WebSocket, an asyncio.Queue (four deques, 3.3 KB), a task that
sleeps until the next ping, a reader task under `asyncio.wait_for` and a writer that polls its queue under another
`wait_for` (a task and a timer handle each time it wakes), about 9 KB in all. Here the queue is a list, the ping is
one timer handle that also watches for the pong, the reader runs in the request's own task and the writer waits on
the queue alone. The protocol is engine.io's: the same packets, pings and timeouts. Two things differ, both on the
way out: a session the server closes (a ping timeout, a disconnect) closes its WebSocket after the packets queued,
where engine.io left it to the client or to its 45 s read timeout; and a frame that is not an Engine.IO packet ends
the session cleanly, where engine.io's reader raised out of the request and left its writer task behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from engineio import exceptions, packet
from engineio.async_drivers.aiohttp import WebSocket
from engineio.async_socket import AsyncSocket

COMPACT_AFTER = 64  # taken items a queue's list may keep at its front (and no more than the items still waiting)
READ_TURNS = 3  # turns of the event loop a WebSocket's reader gives up after each packet, as engine.io's did
_closing: set[asyncio.Future[None]] = set()  # sessions being closed for a missing pong (a task needs a reference)


class PacketQueue:
    """asyncio.Queue's interface as engine.io uses it (unbounded, put/get/task_done/join), in about 200 bytes.

    Items are kept in a list read from an index, so a burst stays O(1) per item; the futures of waiting getters
    and joiners exist only while someone waits.
    """

    __slots__ = ("_getters", "_head", "_items", "_joiners", "_unfinished")

    def __init__(self, maxsize: int = 0) -> None:
        self._items: list[Any] = []
        self._head = 0
        self._getters: list[asyncio.Future[None]] = []
        self._unfinished = 0
        self._joiners: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items) - self._head

    def empty(self) -> bool:
        """Whether no item waits."""
        return self._head >= len(self._items)

    def put_nowait(self, item: Any) -> None:
        """Append `item` and wake one waiting getter."""
        self._items.append(item)
        self._unfinished += 1
        self._wake_getter()

    async def put(self, item: Any) -> None:
        """put_nowait (the queue is unbounded)."""
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        """The oldest item, or asyncio.QueueEmpty."""
        items = self._items
        head = self._head
        if head >= len(items):
            raise asyncio.QueueEmpty
        item = items[head]
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        elif head >= COMPACT_AFTER and head * 2 >= len(items):  # taken items never outnumber waiting ones for long
            del items[:head]
            head = 0
        else:
            items[head - 1] = None
        self._head = head
        return item

    async def get(self) -> Any:
        """The oldest item, waiting for one; cancellation leaves the queue as it was (as asyncio.Queue's)."""
        while self._head >= len(self._items):
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                if not self.empty() and not getter.cancelled():
                    self._wake_getter()
                raise
        return self.get_nowait()

    def task_done(self) -> None:
        """One taken item is handled; join() returns once all are."""
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners:
            for joiner in self._joiners:
                if not joiner.done():
                    joiner.set_result(None)
            self._joiners = None

    async def join(self) -> None:
        """Wait until every item put has been taken and marked done."""
        if self._unfinished > 0:
            joiner: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(joiner)
            await joiner

    def _wake_getter(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return


class LeanSocket(AsyncSocket):
    """engine.io's AsyncSocket with one timer instead of a ping task, and a WebSocket served without extra tasks.

    The timer sends the ping `ping_interval` after the last pong, then waits `ping_timeout` for the next pong and
    closes the session if none came (what engine.io's reader timeout and service task did between them). Once a
    session is closed on the server's side, its WebSocket is closed too, after the packets already queued.
    """

    last_ping: float | None  # engine.io's: when the unanswered ping went out
    connected: bool
    _timer: asyncio.TimerHandle | None = None
    _writer: asyncio.Task[None] | None = None

    def schedule_ping(self) -> None:
        """After a pong (or the handshake): the next ping in `ping_interval`."""
        if self.last_ping:
            self.last_ping = None
            if not self.closing and not self.closed:
                self._set_timer(self.server.ping_interval, self._ping_due)

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _ping_due(self) -> None:
        self._timer = None
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.queue.put_nowait(packet.Packet(packet.PING))
            self._set_timer(self.server.ping_timeout, self._pong_overdue)

    def _pong_overdue(self) -> None:
        self._timer = None
        if self.last_ping and not self.closing and not self.closed:
            self.server.logger.info("%s: Client is gone, closing socket", self.sid)
            task = asyncio.ensure_future(self.close(wait=False, abort=False, reason=self.server.reason.PING_TIMEOUT))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        """engine.io's close; then no more pings, and a WebSocket writer ends after what is queued (closing it)."""
        await super().close(wait=wait, abort=abort, reason=reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None and not self._writer.done():
            self.queue.put_nowait(None)

    async def _websocket_handler(self, ws: WebSocket) -> None:
        """Engine.IO over a WebSocket: the upgrade probe, then read here and write from one task on the queue."""
        max_size = self.server.max_http_buffer_size
        if self.connected:  # an upgrade from long-polling: engine.io's probe exchange
            self.upgrading = True
            try:
                probe = packet.Packet(encoded_packet=await ws.wait())
            except OSError:
                return
            if probe.packet_type != packet.PING or probe.data != "probe":
                self.server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
                self.upgrading = False
                return
            await ws.send(packet.Packet(packet.PONG, data="probe").encode())
            await self.queue.put(packet.Packet(packet.NOOP))  # ends the pending poll
            try:
                upgrade = packet.Packet(encoded_packet=await ws.wait())
            except OSError:
                self.upgrading = False
                return
            if upgrade.packet_type != packet.UPGRADE:
                self.upgraded = False
                self.server.logger.info("%s: Failed websocket upgrade, expected UPGRADE packet", self.sid)
                self.upgrading = False
                return
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True
        self._writer = writer = asyncio.ensure_future(self._write(ws))
        try:
            while True:
                try:
                    data = await ws.wait()
                    if data and len(data) > max_size:
                        break
                    pkt = packet.Packet(encoded_packet=data)
                except Exception:  # closed, failed or malformed: the session ends
                    break
                try:
                    await self.receive(pkt)
                except exceptions.UnknownPacketError:
                    pass
                except exceptions.SocketIsClosedError:
                    break
                except Exception:
                    self.server.logger.exception("Unknown receive error")
                data = pkt = None  # an idle socket keeps nothing of what it received
                # Frames that arrived together are read without waiting. engine.io's reader took three turns of the
                # loop per packet (its task, the task's end, the wait's wake-up), and the rest of the server is paced
                # by that: between two packets of a flood, the handler started by the first runs as far as it did
                # (admitted or refused, its emits published). Without these turns a flood piled up three times the
                # handlers at once and exhausted the Redis manager's connection pool (tests/test_abuse_queues.py).
                for _ in range(READ_TURNS):
                    await asyncio.sleep(0)
            self.queue.put_nowait(None)  # the writer sends what is queued, then closes the WebSocket
            await writer
        finally:
            # Cancelled too (the connection was lost, or the server stops): the session still ends here.
            if not writer.done():
                self.queue.put_nowait(None)
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
            if self.closed and self.server.sockets.get(self.sid) is self:
                del self.server.sockets[self.sid]  # as engine.io does once the request ends (not when it is cancelled)

    async def _write(self, ws: WebSocket) -> None:
        """Send queued packets in order until a None, then close the WebSocket."""
        queue = self.queue
        while True:
            pkt = await queue.get()
            queue.task_done()
            if pkt is None:
                break
            try:
                await ws.send(pkt.encode())
            except Exception:
                break
            pkt = None  # an idle socket keeps nothing of what it sent (a join's history, say)
        await ws.close()


class LeanWebSocket(WebSocket):
    """engine.io's aiohttp WebSocket, with permessage-deflate as the server says (WS_COMPRESSION).

    Refusing it here (it costs ~95 KB a socket for small messages) replaces a middleware that copied every handshake
    request without the offer, a copy each socket kept.
    """

    async def __call__(self, environ: dict[str, Any]) -> web.WebSocketResponse:
        request: web.Request = environ["aiohttp.request"]
        server = self.server
        self._sock = web.WebSocketResponse(max_msg_size=server.max_http_buffer_size, compress=server.ws_compression)
        await self._sock.prepare(request)
        self.environ = environ
        await self.handler(self)
        return self._sock
