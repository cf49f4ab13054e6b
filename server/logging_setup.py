"""Loguru configured once from settings: text for people, one JSON object a line for machines."""

from __future__ import annotations

import logging
import sys

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


def configure_logging(settings: Settings) -> None:
    """Route every log line through one sink with the configured level and format."""
    logger.remove()
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
