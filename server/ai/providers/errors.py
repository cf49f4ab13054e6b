"""Turning SDK failures into short, secret-free reasons and Retry-After hints."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def retry_after_from_headers(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(tz=UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def describe_failure(err: BaseException) -> str:
    """A reason for logs and events: the error's type, never its text (which may echo a key or URL)."""
    if isinstance(err, TimeoutError):
        return "timeout"
    name = type(err).__name__
    return {"APITimeoutError": "timeout", "APIConnectionError": "connection error"}.get(name, name)
