"""What storage raises: its own outcomes, named for what happened, never an HTTP error (the edges map them).

`server.errors.api_error_from` turns each into the contract's error, for REST and Socket.IO alike.
"""

from __future__ import annotations

from typing import Final

from redis.exceptions import ConnectionError as _RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import RedisError as _RedisError
from redis.exceptions import TimeoutError as _RedisTimeoutError

__all__ = [
    "STORAGE_DOWN",
    "STORAGE_FAILED",
    "BadCursor",
    "BufferFull",
    "LockError",
    "MessageUnknown",
    "OverLimit",
    "ReplyUnknown",
    "SessionGone",
    "StorageError",
    "TokenRefused",
]

# Storage is down: Redis cannot be reached or did not answer in time. These are redis-py's own errors (its
# BusyLoadingError, a restarted Redis still loading its data, is a ConnectionError), raised as they are: wrapping
# every call in a translation would cost the hot path a frame per command for nothing a caller could use. An
# OSError that is not wrapped by redis-py is a bug or a disk problem, not an outage.
STORAGE_DOWN: Final = (_RedisConnectionError, _RedisTimeoutError)

# Any command Redis refused or could not run (STORAGE_DOWN included): for health reports, where every failure is "down".
STORAGE_FAILED: Final = (_RedisError,)


class StorageError(Exception):
    """Base of storage's own outcomes (not outages: those are STORAGE_DOWN)."""


class SessionGone(StorageError):
    """The session never existed, expired or was deleted: there is nothing to attach this write to."""


class MessageUnknown(StorageError):
    """A message id the session's history does not hold (or no longer holds: trimmed)."""

    def __init__(self, field: str, message_id: str | None = None) -> None:
        super().__init__(f"no message {message_id!r} in this session")
        self.field = field  # the request field that named it (`before`)
        self.message_id = message_id


class OverLimit(StorageError):
    """A fixed-window rate limit refused the write (nothing was stored); `retry_after` seconds until it reopens."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"over the limit for another {retry_after:.3f} s")
        self.retry_after = retry_after


class ReplyUnknown(StorageError):
    """Feedback for a message that is not one of the session's assistant replies."""


class BadCursor(StorageError):
    """A ticket page cursor this server did not hand out."""


class TokenRefused(StorageError):
    """A missing, wrong, rotated or revoked session token, or an unknown session: one outcome, so nothing leaks."""


class BufferFull(StorageError):
    """Redis is unreachable and the write-behind buffer holds WRITE_BEHIND_CAPACITY writes: nothing more is taken."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the write-behind buffer is full")
        self.retry_after = retry_after


# LockError (re-exported above) is redis-py's: the session lock could not be taken or renewed.
