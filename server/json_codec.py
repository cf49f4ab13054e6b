"""One strict JSON policy for REST bodies and Socket.IO packets, decoded by orjson on the hot path.

Accepted: UTF-8 text holding RFC 8259 JSON with finite numbers, no lone surrogates and at most
`MAX_DEPTH` levels of nesting; a duplicate key keeps its last value. Everything else is refused
as the client's mistake, never as a server error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

MAX_DEPTH = 32
"""Levels of arrays and objects a body or event payload may nest (orjson itself stops at 1024)."""

# A Socket.IO event packet's data opens with the event name: `["name", ...`. Bounded, so a hostile
# packet costs a short regex match at most.
_EVENT_NAME = re.compile(r'\s{0,16}\[\s{0,16}("(?:[^"\\\x00-\x1f]|\\.){0,256}")\s{0,16}[,\]]')


class InvalidJson(ValueError):
    """Input outside the policy above; the message says why, in words a client developer can act on."""


@dataclass(frozen=True, slots=True)
class MalformedPayload:
    """Stands in for the arguments of a Socket.IO event whose JSON was refused, so its handler can answer."""

    reason: str


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """Decode under the policy or raise InvalidJson (REST bodies come here as bytes)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise InvalidJson(_reason(err)) from None
    if _deeper_than(value, MAX_DEPTH):
        raise InvalidJson(f"Nested more than {MAX_DEPTH} levels deep.")
    return value


def _reason(err: orjson.JSONDecodeError) -> str:
    """orjson's own words (without the position, which is meaningless inside a Socket.IO packet)."""
    return f"Not valid JSON: {err.msg}."


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest beyond `limit`; recursion is bounded by the limit itself.

    A plain loop with exact type checks (orjson makes only dict and list): this runs on every packet.
    """
    kind = type(value)
    if kind is dict:
        children = value.values()
    elif kind is list:
        children = value
    else:
        return False
    if limit <= 0:
        return True
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and _deeper_than(child, limit - 1):
            return True
    return False


class SocketIOCodec:
    """Socket.IO's `json` module: orjson both ways, refused event payloads turned into MalformedPayload.

    python-socketio decodes a packet's ack id before its JSON, then calls `loads` on the rest; an
    exception there drops the packet and the client's ack never comes. So an event packet whose
    arguments break the policy decodes to `[event, MalformedPayload(reason)]` instead, and the handler
    edge answers it with validation_error. Only packets orjson refused pay for that (a bounded regex).
    """

    @staticmethod
    def dumps(obj: Any, **_: Any) -> str:
        """orjson, or the standard library for what orjson cannot encode (integers beyond 64 bits)."""
        try:
            return orjson.dumps(obj).decode()
        except TypeError:
            return json.dumps(obj, separators=(",", ":"))

    @staticmethod
    def loads(data: str | bytes, **_: Any) -> Any:
        """The decoded packet data; `[event, MalformedPayload]` for an event whose arguments were refused."""
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            return [_event_name(data, err), MalformedPayload(_reason(err))]
        if _deeper_than(value, MAX_DEPTH + 1):  # the packet's own array is one level more than the payload
            return [_event_name(data, None), MalformedPayload(f"Nested more than {MAX_DEPTH} levels deep.")]
        return value


def _event_name(data: str | bytes, err: orjson.JSONDecodeError | None) -> str:
    """The event name at the head of a refused packet; InvalidJson when there is none to answer to."""
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    match = _EVENT_NAME.match(text)
    if match is not None:
        try:
            name = orjson.loads(match.group(1))
        except orjson.JSONDecodeError:
            name = None
        if isinstance(name, str):
            return name
    raise InvalidJson(_reason(err) if err is not None else "Not a Socket.IO event.")
