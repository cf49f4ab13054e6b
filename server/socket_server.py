"""python-socketio's AsyncServer, taught to tell handlers whether the client asked for an acknowledgement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import socketio

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
    """AsyncServer whose handlers know about the ack and can act after it."""

    async def _handle_event_internal(  # type: ignore[override]
        self, server: socketio.AsyncServer, sid: str, eio_sid: str, data: list[Any], namespace: str, id: int | None
    ) -> None:
        _ack_requested.set(id is not None)
        pending: list[Callable[[], Awaitable[Any]]] = []
        _after_ack.set(pending)
        await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        for callback in pending:
            await callback()
