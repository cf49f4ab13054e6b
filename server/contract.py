"""The contract's objects as typed structures, so a misspelt key is a type error instead of a client's surprise.

They are TypedDicts, not classes: each is stored and sent as the very JSON object the contract names (orjson writes
them with no conversion on the hot path), and the factories below are the one place each kind is built.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, NotRequired, TypedDict


class SessionState(StrEnum):
    """Where a conversation stands: with the AI, waiting for a person, with a person, kept in a ticket, or closed."""

    ACTIVE = "active"
    WAITING_AGENT = "waiting_agent"
    AGENT = "agent"
    TICKET = "ticket"
    CLOSED = "closed"  # an agent closed it with a resolution


HELD_BY_PEOPLE = frozenset({SessionState.WAITING_AGENT, SessionState.AGENT})  # the AI does not answer these


class Trigger(StrEnum):
    """Why a conversation was escalated: the contract's five triggers."""

    KEYWORD = "keyword"
    LOW_CONFIDENCE = "low_confidence"
    ERROR = "error"
    USER_REQUEST = "user_request"
    SENTIMENT = "sentiment"  # the visitor reads clearly upset: strongly negative, insulting, or negative again and again


Role = Literal["user", "assistant", "agent", "system"]
TicketStatus = Literal["open", "resolved"]


class MessageSource(TypedDict):
    """A knowledge-base entry an assistant message used; `[n]` in the message's content is its `sources[n - 1]`."""

    id: str
    title: str


class Message(TypedDict):
    """One entry of a conversation's history, exactly as clients receive it."""

    id: str
    sessionId: str
    role: Role
    content: str
    createdAt: str
    clientMessageId: NotRequired[str]
    provider: NotRequired[str | None]
    confidence: NotRequired[float | None]
    replyTo: NotRequired[str]
    stopped: NotRequired[bool]
    incomplete: NotRequired[bool]
    agentName: NotRequired[str]
    sources: NotRequired[list[MessageSource]]  # assistant messages only; [] when no knowledge-base entry was used


class EscalationRecord(TypedDict):
    """An escalation as stored with its session and sent in `escalation-needed`."""

    sessionId: str
    trigger: Trigger
    reason: str
    createdAt: str


class PreviewLine(TypedDict):
    """A short line of the conversation shown to agents in the queue."""

    role: str
    content: str


class QueueEntry(TypedDict):
    """A conversation waiting in the agents' queue."""

    sessionId: str
    userId: str
    trigger: str
    reason: str
    preview: list[PreviewLine]
    waitingSince: str
    summary: str | None
    language: NotRequired[str | None]  # the visitor's language (ISO 639-1), None when not known


class Ticket(TypedDict):
    """What keeps a conversation nobody could take: its transcript, why, and how to reach the visitor."""

    id: str
    sessionId: str
    userId: str | None
    status: TicketStatus
    trigger: str
    reason: str
    summary: str | None
    transcript: list[Message]
    contact: dict[str, str] | None
    createdAt: str
    updatedAt: str
    resolution: NotRequired[str | None]
    resolvedBy: NotRequired[str]
    resolvedAt: NotRequired[str]


class ChunkEvent(TypedDict):
    """`message-chunk`: the next piece of a reply being written (`reset`: drop what came before)."""

    sessionId: str
    messageId: str
    index: int
    delta: str
    provider: str | None
    reset: bool


class InterruptedEvent(TypedDict):
    """`message-interrupted`: a provider broke off mid-answer; the next one starts over."""

    sessionId: str
    messageId: str
    provider: str
    reason: str


class InProgress(TypedDict):
    """The reply still being written, as a (re)joining client receives it in `chat-joined`."""

    messageId: str
    text: str
    index: int


def now_iso(ts: float | None = None) -> str:
    """Contract timestamps: ISO 8601 in UTC with milliseconds."""
    moment = datetime.fromtimestamp(ts if ts is not None else time.time(), tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    """Opaque, unguessable ids (122 random bits)."""
    return str(uuid.uuid4())


def new_message(session_id: str, role: Role, content: str, **extra: object) -> Message:
    """A message stamped now with a fresh id; `extra` carries the optional fields (provider, replyTo, ...)."""
    message: Message = {"id": new_id(), "sessionId": session_id, "role": role, "content": content, "createdAt": now_iso()}
    message.update(extra)  # type: ignore[typeddict-item]
    return message
