"""The contract's error object, shared by REST answers and Socket.IO acks."""

from __future__ import annotations

from typing import Any

from server.storage import errors as storage_errors

STATUS_BY_CODE: dict[str, int] = {
    "validation_error": 400,
    "unauthorized": 401,
    "not_found": 404,
    "payload_too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}


class ApiError(Exception):
    """A failure the client is told about in the contract's `{code, message, details?}` shape."""

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        """The HTTP status the contract pairs with this code."""
        return STATUS_BY_CODE.get(self.code, 500)

    def to_dict(self) -> dict[str, Any]:
        """The Error object as clients receive it."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def storage_unavailable(retry_after: float = 2) -> ApiError:
    """Redis is unreachable and nothing could be buffered for this request: the client retries shortly."""
    return ApiError("unavailable", "Storage is unavailable right now; please retry shortly.", retry_after=retry_after)


def unauthorized() -> ApiError:
    """One answer for a missing token, a wrong token and an unknown session: it reveals nothing."""
    return ApiError("unauthorized", "A valid session token is required.")


def api_error_from(exc: BaseException) -> ApiError | None:
    """The contract error a failure is answered with at the edges (REST and Socket.IO); None for an unexpected one.

    Storage raises its own exceptions (server/storage/errors.py): this is the one place they become contract errors.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, storage_errors.SessionGone):
        return ApiError("not_found", "The session has ended.")
    if isinstance(exc, storage_errors.TokenRefused):
        return unauthorized()
    if isinstance(exc, storage_errors.MessageUnknown):
        return ApiError("validation_error", "Unknown message id.", {exc.field: "No such message in this session."})
    if isinstance(exc, storage_errors.ReplyUnknown):
        return ApiError("not_found", "No such reply in this session.")
    if isinstance(exc, storage_errors.BadCursor):
        return ApiError("validation_error", "Invalid cursor.", {"cursor": "Not a cursor this server gave."})
    if isinstance(exc, storage_errors.BufferFull):
        return storage_unavailable(retry_after=exc.retry_after)
    if isinstance(exc, storage_errors.STORAGE_DOWN):
        return storage_unavailable()
    return None


def validation_error(details: dict[str, Any], message: str = "The request is not valid.") -> ApiError:
    """Wrap a marshmallow error map in the contract's shape."""
    return ApiError("validation_error", message, _flatten(details))


def _flatten(details: Any) -> dict[str, Any]:
    """Marshmallow nests lists of messages; clients want one readable string per field."""
    if not isinstance(details, dict):
        return {"_schema": str(details)}
    out: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, list):
            out[str(key)] = " ".join(str(v) for v in value)
        elif isinstance(value, dict):
            out[str(key)] = _flatten(value)
        else:
            out[str(key)] = str(value)
    return out
