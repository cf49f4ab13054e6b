"""python-socketio's AsyncServer, taught to tell handlers whether the client asked for an acknowledgement.

It also guards the transport: binary packets are refused before python-socketio buffers their attachments, a
transport that joins no namespace within SOCKET_CONNECT_TIMEOUT is closed, and so is one that keeps sending
namespace CONNECTs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import socketio
from loguru import logger
from socketio import packet

from server.errors import ApiError
from server.realtime.transport_guard import GuardedEngineIO, TransportGuard

BINARY_PACKET_TYPES = (str(packet.BINARY_EVENT), str(packet.BINARY_ACK))
MAX_CONNECT_ATTEMPTS = 5  # namespace CONNECTs one transport may send (a refused one may be retried a few times)
MAX_DROPPED_ATTACHMENTS = 8  # attachments of a refused BINARY_EVENT dropped as they arrive; more closes the transport
BINARY_REFUSED = ApiError("validation_error", "Binary attachments are not accepted.")

_ack_requested: ContextVar[bool] = ContextVar("ack_requested", default=False)
_after_ack: ContextVar[list[Callable[[], Awaitable[Any]]] | None] = ContextVar("after_ack", default=None)


def ack_requested() -> bool:
    """Whether the event being handled came with an ack id (else failures go out as `chat-error`)."""
    return _ack_requested.get()


def after_ack(callback: Callable[[], Awaitable[Any]]) -> None:
    """Run `callback` once the ack has been sent, so a client sees the ack before what follows it."""
    pending = _after_ack.get()
    if pending is None:
        raise RuntimeError("after_ack used outside an event handler")
    pending.append(callback)


class ChatSocketServer(socketio.AsyncServer):
    """AsyncServer whose handlers know about the ack and can act after it, behind a guarded transport."""

    def __init__(
        self,
        *args: Any,
        connect_timeout: float = 45.0,
        ws_compression: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.connect_timeout = connect_timeout
        self.eio.ws_compression = ws_compression
        self._join_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._connect_attempts: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._dropping: dict[str, int] = {}

    def _engineio_server_class(self) -> type[GuardedEngineIO]:
        return GuardedEngineIO

    @property
    def guard(self) -> TransportGuard:
        """Admission check, client address and refusal hook of the Engine.IO edge (set by the app)."""
        return self.eio.guard  # type: ignore[no-any-return]

    @property
    def engine_connections(self) -> int:
        """Engine.IO transports open on this process, joined to a namespace or not."""
        return len(self.eio.sockets)

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> None:
        await super()._handle_eio_connect(eio_sid, environ)
        loop = asyncio.get_running_loop()
        self._join_deadlines[eio_sid] = loop.call_later(self.connect_timeout, self._join_expired, eio_sid)

    def _join_expired(self, eio_sid: str) -> None:
        """No namespace joined in time: close the transport, as socket.io's connectTimeout does."""
        self._join_deadlines.pop(eio_sid, None)
        if not any(self.manager.sid_from_eio_sid(eio_sid, n) for n in list(self.manager.get_namespaces())):
            task = asyncio.get_running_loop().create_task(self._close_transport(eio_sid, "connect_timeout"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        attempts = self._connect_attempts.get(eio_sid, 0) + 1
        self._connect_attempts[eio_sid] = attempts
        if attempts > MAX_CONNECT_ATTEMPTS or self.manager.sid_from_eio_sid(eio_sid, namespace or "/") is not None:
            await self._close_transport(eio_sid, "repeated_connect")
            return
        await super()._handle_connect(eio_sid, namespace, data)
        if self.manager.sid_from_eio_sid(eio_sid, namespace or "/") is not None:
            deadline = self._join_deadlines.pop(eio_sid, None)
            if deadline is not None:
                deadline.cancel()

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """Refuse binary frames and BINARY_EVENT/BINARY_ACK packets before python-socketio buffers anything.

        A BINARY_EVENT from a joined socket is acked `validation_error` and its few announced attachments are
        dropped as they arrive (a counter, nothing kept); an unannounced binary frame, a BINARY_ACK or a packet
        announcing more than MAX_DROPPED_ATTACHMENTS attachments closes the transport.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            left = self._dropping.pop(eio_sid, 0)
            if left > 1:
                self._dropping[eio_sid] = left - 1
            if left < 1:
                await self._close_transport(eio_sid, "binary")
            return
        self._dropping.pop(eio_sid, None)
        if data[:1] not in BINARY_PACKET_TYPES:
            await super()._handle_eio_message(eio_sid, data)
            return
        try:
            pkt = self.packet_class(encoded_packet=data)
        except Exception:  # a malformed header is refused like any unexpected binary packet
            pkt = None
        namespace = (pkt.namespace if pkt is not None else None) or "/"
        if (
            pkt is None
            or pkt.packet_type != packet.BINARY_EVENT
            or not 0 < pkt.attachment_count <= MAX_DROPPED_ATTACHMENTS
            or self.manager.sid_from_eio_sid(eio_sid, namespace) is None
        ):
            await self._close_transport(eio_sid, "binary")
            return
        self._dropping[eio_sid] = pkt.attachment_count  # set before any await: its frames are handled after this
        self.guard.refused("binary_event")
        if pkt.id is not None:
            answer = {"ok": False, "error": BINARY_REFUSED.to_dict()}
            await self._send_packet(eio_sid, self.packet_class(packet.ACK, namespace=namespace, data=[answer], id=pkt.id))

    async def _close_transport(self, eio_sid: str, reason: str) -> None:
        """Close one Engine.IO transport now (its namespaces get their disconnect), and say why."""
        if eio_sid not in self.eio.sockets:
            return
        self.guard.refused(reason)
        request = self.environ.get(eio_sid, {}).get("aiohttp.request")
        logger.warning(
            "socket.io transport closed ({}) for {} sid={}",
            reason,
            self.guard.client_ip(request) if request is not None else "unknown",
            eio_sid,
        )
        await self.eio.close_now(eio_sid)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        deadline = self._join_deadlines.pop(eio_sid, None)
        if deadline is not None:
            deadline.cancel()
        self._connect_attempts.pop(eio_sid, None)
        self._dropping.pop(eio_sid, None)
        await super()._handle_eio_disconnect(eio_sid, reason)

    async def _handle_event_internal(
        self, server: socketio.AsyncServer, sid: str, eio_sid: str, data: list[Any], namespace: str, id: int | None
    ) -> None:
        _ack_requested.set(id is not None)
        pending: list[Callable[[], Awaitable[Any]]] = []
        _after_ack.set(pending)
        await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        for callback in pending:
            await callback()
