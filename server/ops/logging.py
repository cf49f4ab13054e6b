"""Loguru configured once from settings: text for people, one JSON object a line for machines."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from loguru import logger

from server.settings import Settings


class _InterceptHandler(logging.Handler):
    """Sends stdlib logging (aiohttp, socketio) through loguru so there is one format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


# Secrets are masked wherever they appear; personal data only in free text (see mask_sensitive).
_SECRET_MASKS = (
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer ***"),
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{6,}"), "sk-***"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{10,}"), "AIza***"),
)
_PERSONAL_MASKS = (
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), "[card]"),
    (re.compile(r"(?<![\w.:])\+?\d[\d ()-]{7,}\d(?![\w.])"), "[phone]"),
)
# What a log line names things by: UUIDs (sessions, messages), ticket ids, ISO 8601 dates and times. Their
# digit runs look like phone numbers, and a session's lines must stay findable by its id.
_IDENTIFIERS = re.compile(
    r"(?<![0-9A-Za-z])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![0-9A-Za-z])"
    r"|\bT-[0-9A-F]{10}\b"
    r"|\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"
)
# Characters that could start a forged line or reorder what a terminal shows: C0/C1 controls, the Unicode
# line and paragraph separators, and the bidirectional embedding, override and isolate controls.
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


# What any mask needs somewhere in the text it could change: a secret's fixed part; an email's @, or the digit run
# of a card or phone number (each of those matches this). Text without one is left as it is, unsearched.
_SECRET_HINT = re.compile(r"(?i:bearer)|k-|AIza")
_PERSONAL_HINT = re.compile(r"@|\d[\d ()-]{7,}\d")
EXTRAS_KEPT = 4096  # escaped and masked values of bound fields (socket and session ids recur on every line)


def escape_controls(text: str) -> str:
    """Control characters written as visible escapes, so a visitor's text can never start a log line of its own."""
    return _UNSAFE_CHARS.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


def _mask_personal(text: str) -> str:
    if _PERSONAL_HINT.search(text) is None:
        return text
    for pattern, replacement in _PERSONAL_MASKS:
        text = pattern.sub(replacement, text)
    return text


def mask_sensitive(text: str) -> str:
    """API keys and bearer tokens never reach a log line; emails, phone and card numbers are masked in free text.

    Identifiers (UUIDs, ticket ids, timestamps) are left as they are: the phone mask would otherwise rewrite
    the digit runs of session ids, and a session's log lines could not be found. A text (or a stretch between
    identifiers) with nothing a mask could match is not searched by every mask: a log line costs microseconds.
    """
    if _SECRET_HINT.search(text) is not None:
        for pattern, replacement in _SECRET_MASKS:
            text = pattern.sub(replacement, text)
    if _PERSONAL_HINT.search(text) is None:
        return text
    parts: list[str] = []
    last = 0
    for match in _IDENTIFIERS.finditer(text):
        parts.append(_mask_personal(text[last : match.start()]))
        parts.append(match.group())
        last = match.end()
    parts.append(_mask_personal(text[last:]))
    return "".join(parts)


def _masked(value: str) -> str:
    """`value` escaped and masked."""
    return mask_sensitive(escape_controls(value))


_masked_extra: dict[str, str] = {}


def _mask_record(record: Any) -> None:
    """Escape, then mask, the message and every text field bound to the record (the fields' results kept)."""
    record["message"] = _masked(record["message"])
    extra = record["extra"]
    for key, value in extra.items():
        if isinstance(value, str):
            masked = _masked_extra.get(value)
            if masked is None:
                if len(_masked_extra) >= EXTRAS_KEPT:
                    _masked_extra.clear()
                masked = _masked_extra[value] = _masked(value)
            extra[key] = masked


def configure_logging(settings: Settings) -> None:
    """Route every log line through one sink with the configured level and format."""
    logger.remove()
    logger.configure(patcher=_mask_record)
    if settings.log_format == "json":
        logger.add(sys.stderr, level=settings.log_level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=settings.log_level,
            backtrace=False,
            diagnose=False,
            format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
