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


_MASKS = (
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer ***"),
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{6,}"), "sk-***"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{10,}"), "AIza***"),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), "[card]"),
    (re.compile(r"(?<![\w.:])\+?\d[\d ()-]{7,}\d(?![\w.])"), "[phone]"),
)


def mask_sensitive(text: str) -> str:
    """Emails, phone and card numbers, API keys and bearer tokens never reach a log line."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def _mask_record(record: Any) -> None:
    record["message"] = mask_sensitive(record["message"])


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
