"""Logging set-up: structlog events to stderr, readable on a terminal and JSON otherwise."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Rich events (`job_started`, `epoch_done`, …) with bound context; data goes to stdout, logs to stderr."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=use_color())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def use_color(stream=None) -> bool:
    """ANSI colors on `stream` (stderr): FORCE_COLOR forces them, NO_COLOR turns them off (no-color.org), else only
    on a terminal."""
    if os.environ.get("FORCE_COLOR", "") not in ("", "0"):
        return True
    if os.environ.get("NO_COLOR"):
        return False
    return (stream or sys.stderr).isatty()


def get_logger(**context):
    return structlog.get_logger("l2cluster").bind(**context)
